"""scripts/kept_sets.sh: distillation sets kept in git history come back byte for byte, or not at all."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kept_sets.sh"
pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("sha256sum") is None,
                                reason="needs git and sha256sum")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A repository whose first commit holds two sets and whose second takes them out of the tree."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "kept_sets.sh")
    (tmp_path / "data" / "distill").mkdir(parents=True)
    blobs = {"a": bytes(range(256)) * 40, "b": b"\x00tar\xff" * 999}
    for tag, blob in blobs.items():
        (tmp_path / "data" / "distill" / f"data-{tag}.tar").write_bytes(blob)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "sets")
    commit = git(tmp_path, "rev-parse", "HEAD")
    git(tmp_path, "rm", "-q", "-r", "data")
    sums = {tag: hashlib.sha256(blob).hexdigest() for tag, blob in blobs.items()}
    sums["b"] = "0" * 64  # a list entry that does not match what the commit holds
    sums["gone"] = sums["a"]  # listed, but the commit holds no such file
    lines = ["# commit tag sha256 what", *(f"{commit} {tag} {s} a set" for tag, s in sums.items())]
    (tmp_path / "scripts" / "kept_sets.txt").write_text("\n".join(lines))  # no newline after the last line
    return tmp_path, blobs


def run(repo, *tags, env=None):
    return subprocess.run(["bash", str(repo / "scripts" / "kept_sets.sh"), *tags], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_a_set_comes_back_from_history_byte_for_byte(repo):
    path, blobs = repo
    result = run(path, "a")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (path / ".device" / "kept" / "data-a.tar").read_bytes() == blobs["a"]


def test_kept_names_another_folder_for_sets_carried_in_a_second_call(repo):
    path, blobs = repo
    result = run(path, "a", env={"KEPT": ".device/kept2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (path / ".device" / "kept2" / "data-a.tar").read_bytes() == blobs["a"]
    assert not (path / ".device" / "kept").exists()


@pytest.mark.parametrize("tag, says", [("b", "checksum mismatch"), ("gone", "is not in commit")])
def test_a_set_that_does_not_check_out_leaves_nothing_behind(repo, tag, says):
    """b: its listed sha256 differs from the blob; gone: its commit holds no such file."""
    path, _ = repo
    result = run(path, tag)
    assert result.returncode == 1 and says in result.stdout
    assert list((path / ".device" / "kept").iterdir()) == []


def test_an_unknown_set_is_named_in_the_error_even_beside_a_known_one(repo):
    path, _ = repo
    result = run(path, "a", "nope")
    assert result.returncode == 1 and "no set named nope" in result.stdout
    assert not (path / ".device" / "kept").exists()
