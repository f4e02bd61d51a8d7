"""Checks shared by the readers: one-line errors naming the file or the field.

`read_json_object` reads config.json-like files; `check_safetensors` walks a
safetensors header in pure Python before MLX's C++ reader sees the file; the
range checks below bound config sizes.

Bounds are generous enough for any real Llama-family model up to a few
hundred billion parameters (Llama 3.1 405B: hidden 16384, 126 layers,
128 heads, intermediate 53248, vocabulary 128256) and tight enough that a
crafted config cannot make the loader build millions of layers or allocate
terabytes before its weights are even read.
"""

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict

MAX_HIDDEN = 1 << 16            # hidden_size, exit_dim, head_dim * heads
MAX_LAYERS = 1024               # num_hidden_layers
MAX_HEADS = 1024                # num_attention_heads, num_key_value_heads
MAX_HEAD_DIM = 1024
MAX_INTERMEDIATE = 1 << 20      # feed-forward width
MAX_VOCAB = 1 << 22             # 4,194,304 tokens (largest real vocabularies: ~262k)
MAX_POSITIONS = 1 << 24         # context length (16M tokens)
MAX_DRAFT_LAYERS = 64


def integer(where: str, name: str, value: Any, low: int, high: int) -> int:
    """value as an int in [low, high], else a one-line ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer from {low} to {high}, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {name} = {value} is out of range (expected {low} to {high})")
    return value


def optional_integer(where: str, name: str, value: Any, low: int, high: int):
    return None if value is None else integer(where, name, value, low, high)


def number(where: str, name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {_show(value)}")
    if value < low or value > high or (low_open and value == low):
        bound = f"more than {low}" if low_open else f"at least {low}"
        raise ValueError(f"{where}: {name} = {value} is out of range (expected {bound} and at most {high})")
    return value


def boolean(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be true or false, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- JSON files ----

def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {_show(key)} appears twice")
        out[key] = value
    return out


def read_json_object(path, what: str = "a config", fix: str = "restore or re-create it") -> dict:
    """A JSON file that must hold an object (config.json, an index): a malformed one is one line naming it."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not valid JSON ({problem}): {fix}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not {what} (expected a JSON object, got {type(raw).__name__}): {fix}")
    return raw


# ---- safetensors ----

# The dtypes MLX reads, with their sizes in bytes (F64, F8_E5M2 and sub-byte types it refuses).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "C64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
MAX_TENSOR_DIMS = 16
MAX_TENSOR_DIM = (1 << 31) - 1  # MLX keeps each dimension in an int32


def check_safetensors(path) -> int:
    """Walk a safetensors header before `mx.load` reads the file; return the size of its data section.

    Refuses (ValueError, one line naming the file) a header length past the file
    or over 100 MB, a header that is not a UTF-8 JSON object (or repeats a key),
    `__metadata__` that is not a dict of strings (or null), tensors with an unknown dtype,
    a shape that is not a list of at most 16 non-negative int32 dimensions,
    data_offsets that are not [begin, end] inside the data section with
    end - begin = elements x itemsize, and tensors whose bytes overlap or leave
    holes (the layout the safetensors format requires). MLX itself silently
    accepts negative, wrapped-around and fractional shapes and overlapping data.
    """
    def fail(problem: str):
        raise ValueError(f"could not read safetensors file {path}: {problem} (truncated or corrupt?)")

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            fail(f"only {size} bytes")
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER:
            fail(f"its header claims {n} bytes (at most {MAX_SAFETENSORS_HEADER} are allowed)")
        if n > size - 8:
            fail(f"its header claims {n} bytes but the file has only {size - 8} after the length")
        raw = f.read(n)
    data_size = size - 8 - n
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        fail(f"its header is not UTF-8 JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not isinstance(header, dict):
        fail(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}  # MLX writes null when there is none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail("its __metadata__ is not a mapping of strings to strings")
    spans = []
    for name, entry in header.items():
        what = f"tensor {_show(name)}"
        if not isinstance(entry, dict):
            fail(f"{what} is described by {_show(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            fail(f"{what} has dtype {_show(dtype)}, which MLX cannot read")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(_is_int(d) and 0 <= d <= MAX_TENSOR_DIM for d in shape)):
            fail(f"{what} has shape {_show(shape)} (expected a list of at most {MAX_TENSOR_DIMS} "
                 f"integers from 0 to {MAX_TENSOR_DIM})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            fail(f"{what} has data_offsets {_show(offsets)} (expected [begin, end])")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            fail(f"{what} has data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != nbytes:
            fail(f"{what} of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
                 f"but its data_offsets [{begin}, {end}] hold {end - begin}")
        if nbytes:
            spans.append((begin, end, name))
    reached = 0
    for begin, end, name in sorted(spans):
        if begin < reached:
            fail(f"tensor {_show(name)} overlaps another tensor's data (bytes {begin} to {reached})")
        if begin > reached:
            fail(f"bytes {reached} to {begin} of its data section belong to no tensor")
        reached = end
    if reached != data_size:
        fail(f"bytes {reached} to {data_size} of its data section belong to no tensor")
    return data_size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
