"""Crafted files: bounded time and memory, one ValueError line, never a crash (issue 18, items 4 and 7).

Every hostile file is built here, byte by byte, in tmp_path (no torch needed).
Files that used to kill MLX by a signal or allocate gigabytes are also loaded
in a subprocess under RLIMIT_AS, which must exit normally with one `error:` line.
"""

import json
import resource
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config, tiny_drafter, tiny_model
from mlx_redrafter.drafter import DrafterConfig, load_drafter, save_drafter
from mlx_redrafter.gguf import check_gguf, load_gguf
from mlx_redrafter.llama import ModelArgs
from mlx_redrafter.torch_pickle import MAX_BROADCAST_BYTES, MAX_EXPANSION, load_torch_checkpoint
from conftest import one_line

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 4 << 30


def run_limited(code: str, *args) -> subprocess.CompletedProcess:
    """python3 `code` args..., from the repository root, under a 4 GB address-space limit."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, *code, *map(str, args)], cwd=ROOT, preexec_fn=limit,
                          capture_output=True, text=True, timeout=120)


def assert_clean_refusal(proc, needle=""):
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}: {proc.stderr[-500:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert needle in lines[0]


# ---- PyTorch checkpoints, written without torch ----

def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
    return b"I%d\n" % v


def _tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_pickle(tensors: dict, storage_type: str = "FloatStorage") -> bytes:
    """torch.save's data.pkl: {name: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}."""
    out = b"\x80\x02}"
    for name, (key, offset, size, stride) in tensors.items():
        out += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _str("storage") + b"ctorch\n" + storage_type.encode() + b"\n" + _str(key) + _str("cpu")
        out += _int(0) + b"tQ" + _int(offset) + _tuple(size) + _tuple(stride)
        out += b"\x89ccollections\nOrderedDict\n)R" + b"tRs"
    return out + b"."


def write_checkpoint(path, tensors: dict, storages: dict, storage_type="FloatStorage", pickle_bytes=None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes if pickle_bytes is not None else tensor_pickle(tensors, storage_type))
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def floats(n):
    return np.arange(n, dtype=np.float32).tobytes()


def test_valid_crafted_checkpoint_loads(tmp_path):
    """The writer above makes files the reader accepts: contiguous, transposed, sliced, broadcast rows."""
    path = write_checkpoint(tmp_path / "ok.bin", {
        "w": ("0", 0, (3, 4), (4, 1)), "t": ("0", 0, (4, 3), (1, 4)), "s": ("0", 5, (2, 2), (4, 1)),
        "pos": ("1", 0, (1, 8), (0, 1)), "scalar": ("0", 11, (), ()), "empty": ("0", 12, (0, 4), (4, 1)),
    }, {"0": floats(12), "1": floats(8)})
    got = load_torch_checkpoint(path)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(got["t"], w.T)
    np.testing.assert_array_equal(got["s"], [[5, 6], [9, 10]])
    np.testing.assert_array_equal(got["pos"], np.arange(8, dtype=np.float32)[None])
    assert got["scalar"] == 11 and got["empty"].shape == (0, 4)


HOSTILE_TENSORS = {  # name: (storage elements, offset, size, stride, what the error says)
    "negative-stride": (4096, 4000, (64, 64), (-64, 1), "negative size, stride or offset"),
    "negative-offset": (4096, -64, (64, 64), (64, 1), "negative size, stride or offset"),
    "huge-negative-stride": (4096, 0, (64, 64), (-(2 ** 36), 1), "negative size, stride or offset"),
    "negative-size": (4096, 0, (-1, 64), (64, 1), "negative size, stride or offset"),
    "past-the-end": (4096, 0, (65, 64), (64, 1), "reaches element 4160 of a storage of 4096"),
    "huge-stride": (4096, 0, (2, 64), (2 ** 40, 1), "of a storage of 4096"),
    "offset-past-end": (4096, 4096, (1,), (1,), "of a storage of 4096"),
    "size-overflows-int64": (64, 0, (2 ** 32, 2 ** 32, 2 ** 32), (0, 0, 0), "refusing to expand"),
    "broadcast-bomb": (64, 0, (2 ** 24, 64), (0, 1), "repeats a storage of 64 elements as 1073741824"),
    "mismatched-ranks": (64, 0, (8, 8), (8,), "2 sizes but 1 strides"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TENSORS))
def test_hostile_tensor_is_refused(tmp_path, case):
    n, offset, size, stride, says = HOSTILE_TENSORS[case]
    path = write_checkpoint(tmp_path / f"{case}.bin", {"w": ("0", offset, size, stride)}, {"0": floats(n)})
    with pytest.raises(ValueError) as e:
        load_torch_checkpoint(path)
    one_line(e, str(path), says)


def test_storage_reused_many_times_is_bounded(tmp_path):
    """A 64 kB storage transposed 2,000 times would copy 128 MB from a ~200 kB file: refused."""
    tensors = {f"t{i}": ("0", 0, (128, 128), (1, 128)) for i in range(2000)}
    path = write_checkpoint(tmp_path / "reuse.bin", tensors, {"0": floats(128 * 128)})
    with pytest.raises(ValueError) as e:
        load_torch_checkpoint(path)
    one_line(e, "more tensor data than it holds")


def test_zip_bomb_member_is_refused(tmp_path):
    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", tensor_pickle({"w": ("0", 0, (4,), (1,))}))
        z.writestr("archive/data/0", bytes(64 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ValueError) as e:
        load_torch_checkpoint(path)
    one_line(e, "unpacks to 67108864 bytes")


@pytest.mark.parametrize("pickle_bytes, says", [
    (b"\x80\x02ctorch\nFloatStorage\n)R.", "malformed checkpoint (TypeError"),  # calling a storage type
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(I1\nI0\n(I1\nt(I1\nttR.", "not a storage"),
    (b"\x80\x02X\x01\x00\x00\x00aQ.", "unexpected persistent id"),
    (b"\x80\x02(Q.", "malformed checkpoint (UnpicklingError"),
    (b"\x80\x02]" + b"(" * 10 + b"I1\n", "could not read"),  # truncated
    (b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.", "references os.system"),
])
def test_malformed_pickle_is_one_line(tmp_path, pickle_bytes, says):
    path = write_checkpoint(tmp_path / "bad.bin", {}, {"0": floats(4)}, pickle_bytes=pickle_bytes)
    with pytest.raises(ValueError) as e:
        load_torch_checkpoint(path)
    one_line(e, says)


def test_storage_not_a_whole_number_of_elements(tmp_path):
    path = write_checkpoint(tmp_path / "odd.bin", {"w": ("0", 0, (1,), (1,))}, {"0": b"\0" * 7})
    with pytest.raises(ValueError) as e:
        load_torch_checkpoint(path)
    one_line(e, "not a whole number of FloatStorage elements")


CONVERT = ("-m", "mlx_redrafter", "convert", "drafter")


@pytest.mark.parametrize("case", ["huge-negative-stride", "broadcast-bomb"])
def test_convert_hostile_checkpoint_in_subprocess(tmp_path, case):
    """The command line on files that segfaulted / took 4.4 GB: exit 2, one `error:` line, no output."""
    n, offset, size, stride, says = HOSTILE_TENSORS[case]
    path = write_checkpoint(tmp_path / "drafter.bin", {"lm_head.0.weight": ("0", offset, size, stride)},
                            {"0": floats(n)})
    proc = run_limited(CONVERT, path, tmp_path / "out")
    assert_clean_refusal(proc, says)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def guarded_loop(call: str) -> tuple:
    """python3 -c arguments calling `call` on each file named on the command line, printing one
    `error:` line per refusal as the CLI's guard does; a crash kills the whole process."""
    imports, expr = call.split(":", 1)
    return ("-c", "import sys\n" + imports + "\nfor f in sys.argv[1:]:\n    try:\n        " + expr.strip() +
            "\n    except (ValueError, OSError) as e:\n        print('error: ' + str(e).splitlines()[0], file=sys.stderr)")


def assert_each_refused(proc, files, says):
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: a signal): {proc.stderr[-1500:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(files) and all(line.startswith("error: ") for line in lines), proc.stderr[-3000:]
    for line, f, needle in zip(lines, files, says):
        assert str(f) in line and needle in line, line


def test_hostile_checkpoints_in_subprocess(tmp_path):
    """All hostile tensors through the converter's reader in one memory-limited process: no signal."""
    files = []
    for case in sorted(HOSTILE_TENSORS):
        n, offset, size, stride, _ = HOSTILE_TENSORS[case]
        files.append(write_checkpoint(tmp_path / f"{case}.bin", {"w": ("0", offset, size, stride)}, {"0": floats(n)}))
    proc = run_limited(guarded_loop("from mlx_redrafter.convert import read_shard: read_shard(__import__('pathlib').Path(f))"),
                       *files)
    assert_each_refused(proc, files, [HOSTILE_TENSORS[c][4] for c in sorted(HOSTILE_TENSORS)])


# ---- property tests: the checkpoint validator ----

@st.composite
def tensor_specs(draw):
    ndim = draw(st.integers(0, 4))
    big = st.one_of(st.integers(-3, 70), st.integers(-(2 ** 62), 2 ** 62))
    size = tuple(draw(big) for _ in range(ndim))
    stride = tuple(draw(big) for _ in range(ndim))
    return draw(st.sampled_from(["0", "1"])), draw(big), size, stride


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(tensor_specs(), min_size=1, max_size=4),
       dtype=st.sampled_from(["FloatStorage", "BFloat16Storage", "ByteStorage", "LongStorage"]))
def test_random_tensor_headers_never_crash_or_overallocate(tmp_path, specs, dtype):
    path = write_checkpoint(tmp_path / "random.bin", {f"t{i}": s for i, s in enumerate(specs)},
                            {"0": bytes(64 * 8), "1": bytes(8)}, storage_type=dtype)
    try:
        state = load_torch_checkpoint(path)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    total = sum(v.nbytes for v in state.values())
    assert total <= MAX_EXPANSION * path.stat().st_size + MAX_BROADCAST_BYTES
    for (key, offset, size, stride), got in zip(specs, state.values()):
        assert got.shape == size and min(size, default=0) >= 0 and offset >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoint_bytes_never_crash(tmp_path, data):
    good = tmp_path / "good.bin"
    if not good.exists():
        write_checkpoint(good, {"w": ("0", 0, (4, 8), (8, 1)), "t": ("0", 0, (8, 4), (1, 8))}, {"0": floats(32)})
    raw = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.bin"
    path.write_bytes(bytes(raw))
    try:
        state = load_torch_checkpoint(path)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert sum(v.nbytes for v in state.values()) <= MAX_EXPANSION * len(raw) + MAX_BROADCAST_BYTES


# ---- GGUF, written byte by byte ----

def gstr(text) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key, vtype, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name, dims, ttype, offset=0) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ttype, offset))


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, magic=b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


VALID_GGUF = gguf_bytes(
    [kv("general.architecture", 8, gstr("llama")), kv("llama.block_count", 4, struct.pack("<I", 1)),
     kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("b"))],
    [tensor_info("token_embd.weight", [32, 2], 0, 0), tensor_info("output_norm.weight", [32], 1, 256)],
    np.ones(64, np.float32).tobytes() + np.ones(32, np.float16).tobytes(),
)

HOSTILE_GGUF = {  # the 24-57-byte files that killed MLX by a signal, and their relatives
    "huge-key-length": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2 ** 62) + b"k" * 16, "claims 4611686018427387904 bytes"),
    "huge-tensor-count": (gguf_bytes(n_tensors=2 ** 40), "claims 1099511627776 tensors"),
    "huge-kv-count": (gguf_bytes(n_kv=2 ** 40), "claims 1099511627776 metadata keys"),
    "deprecated-type": (gguf_bytes(tensors=[tensor_info("w", [32], 4)], data=bytes(64)), "type Q4_2"),
    "unknown-type": (gguf_bytes(tensors=[tensor_info("w", [32], 99)], data=bytes(64)), "unknown type 99"),
    "ndim-5": (gguf_bytes(tensors=[tensor_info("w", [1, 1, 1, 1, 1], 0)], data=bytes(64)), "5 dimensions"),
    "ndim-9": (gguf_bytes(tensors=[tensor_info("w", [1] * 9, 0)], data=bytes(64)), "9 dimensions"),
    "ndim-0": (gguf_bytes(tensors=[tensor_info("w", [], 0)], data=bytes(64)), "0 dimensions"),
    "zero-dim": (gguf_bytes(tensors=[tensor_info("w", [0, 4], 0)], data=bytes(64)), "dimensions [0, 4]"),
    "huge-dims": (gguf_bytes(tensors=[tensor_info("w", [2 ** 31 - 1] * 4, 0)], data=bytes(64)), "ends past the end"),
    "data-past-end": (gguf_bytes(tensors=[tensor_info("w", [32], 0, 64)], data=bytes(128)), "ends past the end"),
    "unaligned-offset": (gguf_bytes(tensors=[tensor_info("w", [4], 0, 4)], data=bytes(64)), "not a multiple"),
    "block-mismatch": (gguf_bytes(tensors=[tensor_info("w", [33], 2)], data=bytes(64)), "block of 32"),
    "zero-alignment": (gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 0))]), "general.alignment"),
    "odd-alignment": (gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 24))]), "general.alignment"),
    "string-past-end": (gguf_bytes([kv("k", 8, struct.pack("<Q", 1000) + b"abc")]), "runs past the end"),
    "huge-array": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 6, 2 ** 60))]), "claims 1152921504606846976 elements"),
    "huge-string-array": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 8, 2 ** 40))]), "more than the file holds"),
    "nested-array": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]), "nested"),
    "unknown-value-type": (gguf_bytes([kv("k", 77, b"\0" * 8)]), "unknown value type 77"),
    "not-utf8": (gguf_bytes([kv(b"\xff\xfe", 4, b"\0" * 4)]), "not UTF-8"),
    "duplicate-tensor": (gguf_bytes(tensors=[tensor_info("w", [8], 0), tensor_info("w", [8], 0)], data=bytes(64)),
                         "appears twice"),
    "version-1": (gguf_bytes(version=1), "version 1"),
    "big-endian": (gguf_bytes(version=3 << 24), "big-endian"),
    "bad-magic": (gguf_bytes(magic=b"GGML"), "magic"),
    "tiny": (b"GGUF\3\0", "only 6 bytes"),
}


def test_valid_crafted_gguf_loads_in_mlx(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(VALID_GGUF)
    assert check_gguf(path) == 256 + 64
    weights, meta = mx.load(str(path), return_metadata=True)
    assert weights["token_embd.weight"].shape == (2, 32) and meta["tokenizer.ggml.tokens"] == ["a", "b"]


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_is_refused(tmp_path, case):
    raw, says = HOSTILE_GGUF[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(raw)
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    one_line(e, "could not read GGUF file", str(path), says)


def test_gguf_that_killed_mlx_in_subprocess(tmp_path):
    """SIGSEGV (huge key length, huge tensor count), SIGFPE (deprecated type), SIGABRT (ndim > 4) in
    MLX's reader before; now every hostile GGUF is one `error:` line in a memory-limited process."""
    cases = sorted(HOSTILE_GGUF)
    files = []
    for case in cases:
        files.append(tmp_path / f"{case}.gguf")
        files[-1].write_bytes(HOSTILE_GGUF[case][0])
    proc = run_limited(guarded_loop("from mlx_redrafter.gguf import load_gguf: load_gguf(f)"), *files)
    assert_each_refused(proc, files, [HOSTILE_GGUF[c][1] for c in cases])


# ---- property tests: the GGUF header validator ----

def _mlx_survives(path) -> bool:
    """mx.load on a file check_gguf accepted, in a subprocess: it must not die by a signal."""
    proc = run_limited(("-c", "import sys, mlx.core as mx\ntry: mx.load(sys.argv[1])\nexcept Exception: pass"), path)
    return proc.returncode == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_headers_are_bounded(tmp_path, data):
    raw = bytearray(VALID_GGUF)
    header_end = len(VALID_GGUF) - 384
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, header_end - 1))
        raw[at] = data.draw(st.sampled_from([0, 1, 2, 4, 5, 9, 30, 0x7F, 0x80, 0xFF, data.draw(st.integers(0, 255))]))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(raw))
    try:
        decoded = check_gguf(path)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert decoded <= 6.25 * len(raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=0, max_size=80),
       fields=st.tuples(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 32 - 1)))
def test_random_gguf_headers_are_refused_or_bounded(tmp_path, header, fields):
    version, (n_tensors, n_kv, _) = 3, fields
    path = tmp_path / "random.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + header)
    try:
        decoded = check_gguf(path)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert decoded <= 6.25 * path.stat().st_size


def test_accepted_mutants_do_not_crash_mlx(tmp_path):
    """A sample of mutated files the validator accepts: MLX's own reader survives every one."""
    rng = np.random.default_rng(0)
    accepted = 0
    for i in range(400):
        raw = bytearray(VALID_GGUF)
        for _ in range(3):
            raw[rng.integers(0, len(VALID_GGUF) - 384)] = rng.integers(0, 256)
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(raw))
        try:
            check_gguf(path)
        except ValueError:
            continue
        accepted += 1
        assert _mlx_survives(path), f"mx.load died on a file check_gguf accepted: {bytes(raw)!r}"
        if accepted == 8:
            break
    assert accepted


# ---- configs ----

BASE = tiny_config()


@pytest.mark.parametrize("field, value, says", [
    ("num_hidden_layers", 1e8, "num_hidden_layers must be an integer"),
    ("num_hidden_layers", 10 ** 8, "num_hidden_layers = 100000000 is out of range"),
    ("num_hidden_layers", 0, "num_hidden_layers = 0 is out of range"),
    ("hidden_size", -48, "hidden_size = -48"),
    ("hidden_size", "48", "hidden_size must be an integer"),
    ("hidden_size", True, "hidden_size must be an integer"),
    ("hidden_size", 50, "hidden_size = 50 is not divisible by num_attention_heads = 4"),
    ("vocab_size", 2 ** 40, "vocab_size"),
    ("num_attention_heads", 0, "num_attention_heads"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads = 3"),
    ("num_key_value_heads", 8, "num_key_value_heads = 8 is out of range"),
    ("intermediate_size", 2 ** 40, "intermediate_size"),
    ("head_dim", 0, "head_dim"),
    ("max_position_embeddings", 2 ** 40, "max_position_embeddings"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number"),
    ("rms_norm_eps", 0, "rms_norm_eps = 0"),
    ("rope_theta", -1.0, "rope_theta"),
    ("rope_scaling", "linear", "rope_scaling must be an object"),
    ("rope_scaling", {"type": "linear", "factor": -2}, "rope_scaling.factor"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("rope_parameters", [1], "rope_parameters must be an object"),
])
def test_absurd_model_config_is_refused(field, value, says):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_dict({**BASE, field: value})
    one_line(e, says)


def test_real_400b_sizes_are_accepted():
    llama405b = dict(model_type="llama", hidden_size=16384, num_hidden_layers=126, intermediate_size=53248,
                     num_attention_heads=128, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                     max_position_embeddings=131072, rms_norm_eps=1e-5)
    assert ModelArgs.from_dict(llama405b).head_dim == 128


def test_absurd_config_is_refused_quickly_in_subprocess(tmp_path):
    """num_hidden_layers 1e8 ran 20-30 s then aborted; now one line at once."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": 1e8}))
    proc = run_limited(("-m", "mlx_redrafter", "convert", "base"), tmp_path / "m", tmp_path / "out")
    assert_clean_refusal(proc, "num_hidden_layers must be an integer")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


# ---- drafters ----

@pytest.fixture(scope="module")
def base():
    return tiny_model(tiny_config(vocab_size=20))


@pytest.mark.parametrize("field, value, says", [
    ("num_draft_layers", 1e8, "num_draft_layers must be an integer"),
    ("num_draft_layers", 10 ** 6, "num_draft_layers = 1000000 is out of range"),
    ("vocab_size", 2 ** 30, "vocab_size"),
    ("exit_dim", 0, "exit_dim"),
    ("draft_vocab_size", 21, "draft_vocab_size = 21 is out of range"),
    ("rnn", "no", "rnn must be true or false"),
    ("model_type", "llama", "not a drafter"),
])
def test_absurd_drafter_config_is_refused(tmp_path, base, field, value, says):
    save_drafter(tiny_drafter(base), tmp_path / "d")
    config = tmp_path / "d" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", base)
    one_line(e, str(config), says)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_malformed_drafter_config_names_the_file(tmp_path, base, content):
    save_drafter(tiny_drafter(base), tmp_path / "d")
    (tmp_path / "d" / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", base)
    one_line(e, str(tmp_path / "d" / "config.json"))


def test_drafter_of_another_hidden_size_was_made_for_another_model(tmp_path, base):
    other = tiny_model(tiny_config(vocab_size=20, hidden_size=64))
    save_drafter(tiny_drafter(other, "proj"), tmp_path / "d")
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", base)
    message = one_line(e, "was made for another model", "hidden_size=64")
    assert "input_proj" not in message


@pytest.mark.parametrize("bad_id", [20, 60000, 2 ** 31 - 1, -1])
def test_token_table_outside_the_vocabulary_is_refused(tmp_path, base, bad_id):
    drafter = tiny_drafter(base, "reduced-vocab")
    drafter.draft_to_token = mx.concatenate([drafter.draft_to_token[:-1], mx.array([bad_id], dtype=mx.int32)])
    save_drafter(drafter, tmp_path / "d")
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", base)
    one_line(e, str(tmp_path / "d"), "was made for another model", f"token id {bad_id}")


def test_token_table_of_wrong_dtype_or_shape_is_refused(tmp_path, base):
    from mlx_redrafter.drafter import check_token_table

    config = DrafterConfig(vocab_size=20, hidden_size=48, exit_dim=96, num_draft_layers=1, draft_vocab_size=4)
    with pytest.raises(ValueError, match="not integer token ids"):
        check_token_table(config, mx.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        check_token_table(config, mx.array([0, 1, 2]))


@pytest.mark.parametrize("quantization", [{"group_size": 0, "bits": 8}, {"bits": 8}, "8bit"])
def test_bad_quantization_config_is_refused(tmp_path, base, quantization):
    save_drafter(tiny_drafter(base), tmp_path / "d", bits=8)
    config = tmp_path / "d" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantization": quantization}))
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", base)
    one_line(e, "quantization")


def test_a_token_table_naming_a_token_twice_is_refused():
    """Equal draft tokens would give a tree node two equal children (sampling would be biased)."""
    from mlx_redrafter.drafter import DrafterConfig, check_token_table

    config = DrafterConfig(vocab_size=64, hidden_size=48, exit_dim=96, num_draft_layers=1, draft_vocab_size=4)
    check_token_table(config, mx.array([1, 2, 3, 4]), "x")
    with pytest.raises(ValueError) as e:
        check_token_table(config, mx.array([1, 2, 2, 4]), "x")
    one_line(e, "more than once")
