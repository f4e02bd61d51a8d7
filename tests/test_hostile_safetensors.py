"""Crafted safetensors files and malformed JSON configs (issue 18, item 4): one ValueError line naming
the file, checked in Python before MLX's C++ reader sees the bytes.

Measured on MLX 0.32 before the check: no crafted header killed mx.load by a signal, but it silently
loaded shapes [-1, -4] (negative dimensions), [2**32 + 1] as (1,), [2**33, 2**31] as (0, -2**31),
[1.5] as (1,), tensors whose bytes overlap, and a header with a repeated key (the last one wins);
the rest failed with C++ JSON errors that do not name the file.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import tiny_config, tiny_model
from test_loading import write_model_dir
from mlx_redrafter.cli import app
from mlx_redrafter.convert import read_shard
from mlx_redrafter.loading import load, read_safetensors
from mlx_redrafter.validate import check_safetensors, read_json_object
from conftest import one_line

runner = CliRunner()


def st_bytes(header=None, data=b"", length=None, raw=None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def valid_file(path: Path) -> Path:
    mx.save_safetensors(str(path), {"w": mx.arange(6, dtype=mx.float32).reshape(2, 3),
                                    "b": mx.ones((4,), dtype=mx.float16), "e": mx.zeros((0, 3)),
                                    "i": mx.array([1, 2], dtype=mx.int64)}, metadata={"format": "mlx"})
    return path


def test_files_mlx_writes_pass(tmp_path):
    path = valid_file(tmp_path / "ok.safetensors")
    assert check_safetensors(path) == 6 * 4 + 4 * 2 + 2 * 8
    assert read_safetensors([path])["w"].shape == (2, 3)
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"x": mx.zeros((3,))})  # "__metadata__": null
    assert check_safetensors(tmp_path / "plain.safetensors") == 12


HOSTILE = {
    # name: (file bytes, what the error says)
    "empty": (b"", "only 0 bytes"),
    "short": (b"\x01\x02\x03", "only 3 bytes"),
    "huge-length": (st_bytes({"a": entry()}, b"\0" * 16, length=2 ** 62), "at most 104857600"),
    "length-past-end": (st_bytes({"a": entry()}, b"\0" * 16, length=1000), "the file has only"),
    "not-json": (st_bytes(raw=b"{abc"), "not UTF-8 JSON"),
    "not-utf8": (st_bytes(raw=b'{"\xff": 1}'), "not UTF-8 JSON"),
    "deep": (st_bytes(raw=b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"), "not UTF-8 JSON"),
    "list": (st_bytes([1, 2]), "not an object"),
    "repeated-key": (st_bytes(raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                  b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=b"\0" * 8),
                     "appears twice"),
    "metadata-number": (st_bytes({"__metadata__": {"x": 1}, "a": entry()}, b"\0" * 16), "__metadata__"),
    "metadata-list": (st_bytes({"__metadata__": [1], "a": entry()}, b"\0" * 16), "__metadata__"),
    "entry-number": (st_bytes({"a": 5}), "not an object"),
    "unknown-dtype": (st_bytes({"a": entry("Q9", (2,), (0, 8))}, b"\0" * 8), "dtype 'Q9'"),
    "f64": (st_bytes({"a": entry("F64", (2,), (0, 16))}, b"\0" * 16), "dtype 'F64'"),
    "dtype-number": (st_bytes({"a": entry(5)}, b"\0" * 16), "dtype 5"),
    "negative-dim": (st_bytes({"a": entry(shape=(-1, 4))}, b"\0" * 16), "shape [-1, 4]"),
    "two-negative-dims": (st_bytes({"a": entry(shape=(-1, -4))}, b"\0" * 16), "shape [-1, -4]"),
    "wraps-int32": (st_bytes({"a": entry(shape=(2 ** 32 + 1,), offsets=(0, 4))}, b"\0" * 4), "shape [4294967297]"),
    "zero-times-huge": (st_bytes({"a": entry(shape=(0, 2 ** 31), offsets=(0, 0))}), "shape [0, 2147483648]"),
    "fractional-dim": (st_bytes({"a": entry(shape=(1.5,), offsets=(0, 4))}, b"\0" * 4), "shape [1.5]"),
    "shape-string": (st_bytes({"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}, b"\0" * 4), "shape 'ab'"),
    "too-many-dims": (st_bytes({"a": entry(shape=(1,) * 100, offsets=(0, 4))}, b"\0" * 4), "at most 16"),
    "no-offsets": (st_bytes({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "data_offsets None"),
    "fractional-offset": (st_bytes({"a": entry(shape=(1,), offsets=(0.5, 4))}, b"\0" * 4), "data_offsets [0.5, 4]"),
    "negative-offset": (st_bytes({"a": entry(offsets=(-16, 0))}, b"\0" * 16), "outside the 16-byte"),
    "swapped-offsets": (st_bytes({"a": entry(offsets=(16, 0))}, b"\0" * 16), "outside the 16-byte"),
    "offset-past-end": (st_bytes({"a": entry(shape=(2 ** 20,), offsets=(0, 2 ** 22))}, b"\0" * 16), "outside"),
    "offset-2^63": (st_bytes({"a": entry(offsets=(2 ** 63, 2 ** 63 + 16))}, b"\0" * 16), "outside"),
    "size-mismatch": (st_bytes({"a": entry(shape=(2,))}, b"\0" * 16), "needs 8 bytes"),
    "overlap": (st_bytes({"a": entry(), "b": entry()}, b"\0" * 16), "overlaps"),
    "hole": (st_bytes({"a": entry(shape=(2,), offsets=(8, 16))}, b"\0" * 16), "belong to no tensor"),
    "trailing": (st_bytes({"a": entry(shape=(2,), offsets=(0, 8))}, b"\0" * 16), "belong to no tensor"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_one_line_naming_the_file(tmp_path, case):
    data, says = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    for read in (check_safetensors, lambda p: read_safetensors([p]), read_shard):
        with pytest.raises(ValueError) as e:
            read(path)
        one_line(e, str(path), says)


def test_hostile_model_directory_is_refused_by_load_and_convert(tmp_path):
    """Through the public entry points: `load` and `convert base` (a silently mis-shaped tensor before)."""
    config = tiny_config(vocab_size=64)
    src = write_model_dir(tmp_path / "hf", tiny_model(config), config)
    weights = src / "model.safetensors"
    weights.write_bytes(HOSTILE["two-negative-dims"][0])
    with pytest.raises(ValueError) as e:
        load(str(src))
    one_line(e, str(weights), "shape [-1, -4]")
    r = runner.invoke(app, ["convert", "base", str(src), str(tmp_path / "out")])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and str(weights) in errors[0], r.output
    assert not (tmp_path / "out").exists()


# ---- property test: mutated small valid files ----

def _valid_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return valid_file(Path(d) / "v.safetensors").read_bytes()


VALID = _valid_bytes()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_are_refused_or_load_as_declared(tmp_path, data):
    """Random byte flips and truncations: a one-line ValueError, or a file mx.load reads exactly as the
    header declares (shapes non-negative, every byte inside the file)."""
    raw = bytearray(VALID)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        raw[at] = data.draw(st.sampled_from([0x00, 0x22, 0x2C, 0x2D, 0x30, 0x31, 0x39, 0x5B, 0x5D, 0x7B, 0x7D,
                                             0x80, 0xFF, data.draw(st.integers(0, 255))]))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    try:
        check_safetensors(path)
    except ValueError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    header = json.loads(bytes(raw[8:header_end]))
    header.pop("__metadata__", None)
    loaded = mx.load(str(path))
    assert set(loaded) == set(header)
    for name, info in header.items():
        assert list(loaded[name].shape) == info["shape"] and min(info["shape"], default=0) >= 0
        np.asarray(loaded[name].astype(mx.float32) if loaded[name].dtype != mx.bool_ else loaded[name])


# ---- JSON configs name the file ----

@pytest.mark.parametrize("content, says", [(b"{not json", "is not valid JSON"), (b"[1, 2]", "expected a JSON object"),
                                           (b"\xff\xfe", "is not valid JSON"), (b"[" * 100000, "is not valid JSON")])
def test_malformed_json_object_is_one_line_naming_the_file(tmp_path, content, says):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_json_object(path)
    one_line(e, str(path), says)


@pytest.mark.parametrize("command", ["load", "convert base", "convert drafter", "index"])
def test_malformed_config_names_the_file_everywhere(tmp_path, command):
    config = tiny_config(vocab_size=64)
    src = write_model_dir(tmp_path / "hf", tiny_model(config), config)
    bad = src / ("model.safetensors.index.json" if command == "index" else "config.json")
    bad.write_text("{'single': quotes}")
    if command == "load":
        with pytest.raises(ValueError) as e:
            load(str(src))
        one_line(e, str(bad), "is not valid JSON")
        return
    args = ["convert", "drafter" if command == "convert drafter" else "base", str(src), str(tmp_path / "out")]
    r = runner.invoke(app, args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert str(bad) in errors[0] and "is not valid JSON" in errors[0], errors[0]
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
