"""Read a llama.cpp GGUF file: weights under mlx-lm names, and the model config (the tokenizer: gguf_tokenizer.py).

`mx.load` parses GGUF itself. Q4_0/Q4_1/Q8_0 tensors arrive as MLX quantized
triples (weight uint32, scales, biases; group size 32) and stay quantized;
other types arrive as float16. llama.cpp permutes the q/k rows of Llama models
for its interleaved RoPE; `_unpermute` restores the Hugging Face order.
"""

import math
import mmap
import re
import struct
from typing import Dict, Tuple

import mlx.core as mx

from .llama import ModelArgs

_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# ---- header validation: MLX's C loader trusts every count, length and offset in the
# file (a 24-byte file can make it read gigabytes past the end or divide by zero),
# so the header is walked here first, in pure Python, with every number checked.

# value type -> byte size (8: string, 9: array are walked separately)
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# tensor types MLX's loader reads: type -> (name, weights per block, bytes per block)
_TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 82), 12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 30: ("BF16", 1, 2),
}
_UNSUPPORTED_TYPES = {4: "Q4_2 (removed from GGUF)", 5: "Q4_3 (removed from GGUF)", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1",
                      11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
                      20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 27: "I64", 28: "F64", 29: "IQ1_M"}
MAX_NAME = 1 << 16         # key and tensor names
MAX_STRING = (1 << 31) - 1  # MLX reads lengths into an int
MAX_DIMS = 4
MAX_DIM = (1 << 31) - 1     # MLX shapes are int32


class _Header:
    """A bounds-checked cursor over the file's bytes; every failure names the file."""

    def __init__(self, buf, path):
        self.buf, self.path, self.off, self.size = buf, path, 0, len(buf)

    def fail(self, problem: str):
        raise ValueError(f"could not read GGUF file {self.path}: {problem} (truncated, corrupt or crafted?)")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.off + n > self.size:
            self.fail(f"{what} at byte {self.off} runs past the end of the {self.size}-byte file")
        start, self.off = self.off, self.off + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.uint("<Q", f"the length of {what}")
        if n > limit:
            self.fail(f"{what} claims {n} bytes (at most {limit})")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start: start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8")

    def skip_string(self, what: str):
        n = self.uint("<Q", f"the length of {what}")
        if n > MAX_STRING:
            self.fail(f"{what} claims {n} bytes")
        start = self.take(n, what)
        try:
            bytes(self.buf[start: start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8")

    def value(self, vtype: int, key: str):
        """Check (and skip) one metadata value; returns it when it is a plain number."""
        if vtype in _VALUE_SIZES:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_VALUE_SIZES[vtype]]
            return self.uint(fmt, f"the value of {key}")
        if vtype == _STRING:
            self.skip_string(f"the value of {key}")
        elif vtype == _ARRAY:
            etype = self.uint("<I", f"the element type of {key}")
            n = self.uint("<Q", f"the length of {key}")
            if etype == _ARRAY:
                self.fail(f"{key} is a nested array, which MLX cannot read")
            least = _VALUE_SIZES.get(etype, 8)
            if etype not in _VALUE_SIZES and etype != _STRING:
                self.fail(f"{key} is an array of unknown value type {etype}")
            if n > MAX_STRING or n * least > self.size - self.off:
                self.fail(f"array {key} claims {n} elements, more than the file holds")
            if etype == _STRING:
                for i in range(n):
                    self.skip_string(f"element {i} of {key}")
            else:
                self.take(n * least, f"array {key}")
        else:
            self.fail(f"{key} has unknown value type {vtype}")
        return None


def check_gguf(path) -> int:
    """Walk a GGUF file's header with bounds checks before any C code reads it.

    Refuses (ValueError, one line naming the file) a bad magic or version, key,
    tensor or array counts the file cannot hold, strings past the end, unknown
    value types, nested arrays, tensors with 0 or more than 4 dimensions, empty
    or huge dimensions, tensor types MLX cannot read, duplicate names, bad
    alignment, and tensor data that is unaligned or ends past the file. Returns
    the number of bytes MLX decodes the tensors to (at most 6.25x the file size,
    for Q2_K; near 1x for the types MLX keeps packed).
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(f"could not read GGUF file {path}: only {size} bytes (truncated?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _check_header(_Header(buf, path))


def _check_header(h: _Header) -> int:
    if bytes(h.buf[:4]) != b"GGUF":
        h.fail("it does not start with the GGUF magic")
    h.off = 4
    version = h.uint("<I", "the version")
    if version not in (2, 3):
        h.fail(f"version {version} (big-endian or too old; supported: 2 and 3)")
    n_tensors, n_kv = h.uint("<Q", "the tensor count"), h.uint("<Q", "the key count")
    if n_kv > (h.size - h.off) // 13:  # a key takes at least 8 + 4 + 1 bytes
        h.fail(f"it claims {n_kv} metadata keys, more than the file can hold")
    if n_tensors > (h.size - h.off) // 32:  # a tensor entry takes at least 8 + 4 + 8 + 4 + 8 bytes
        h.fail(f"it claims {n_tensors} tensors, more than the file can hold")
    alignment = 32
    for i in range(n_kv):
        key = h.string(f"the name of metadata key {i}", MAX_NAME)
        vtype = h.uint("<I", f"the type of {key}")
        value = h.value(vtype, key)
        if key == "general.alignment":
            if vtype != _UINT32 or not value or value & (value - 1) or value > 1 << 16:
                h.fail(f"general.alignment must be a power of two stored as uint32, got {value!r} (type {vtype})")
            alignment = value
    tensors, names = [], set()
    for i in range(n_tensors):
        name = h.string(f"the name of tensor {i}", MAX_NAME)
        if name in names:
            h.fail(f"tensor {name} appears twice")
        names.add(name)
        ndim = h.uint("<I", f"the dimension count of {name}")
        if not 1 <= ndim <= MAX_DIMS:
            h.fail(f"tensor {name} has {ndim} dimensions (1 to {MAX_DIMS} are allowed)")
        dims = [h.uint("<Q", f"the dimensions of {name}") for _ in range(ndim)]
        if not all(1 <= d <= MAX_DIM for d in dims):
            h.fail(f"tensor {name} has dimensions {dims} (each must be 1 to {MAX_DIM})")
        ttype = h.uint("<I", f"the type of {name}")
        offset = h.uint("<Q", f"the data offset of {name}")
        if ttype not in _TENSOR_TYPES:
            kind = _UNSUPPORTED_TYPES.get(ttype)
            h.fail(f"tensor {name} has type {kind}, which MLX cannot load: convert the model with another "
                   f"quantization (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16)" if kind else
                   f"tensor {name} has unknown type {ttype}")
        type_name, block, block_bytes = _TENSOR_TYPES[ttype]
        if dims[0] % block:
            h.fail(f"tensor {name} ({type_name}) has rows of {dims[0]}, not a multiple of its block of {block}")
        tensors.append((name, math.prod(dims) // block * block_bytes, offset, math.prod(dims), type_name))
    data_start = h.off + (-h.off) % alignment
    decoded = 0
    for name, nbytes, offset, numel, type_name in tensors:
        if offset % alignment:
            h.fail(f"tensor {name}'s data offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > h.size:
            h.fail(f"tensor {name} ({nbytes} bytes at {data_start + offset}) ends past the end of the "
                   f"{h.size}-byte file")
        # MLX keeps F32/F16/I* and Q4_0/Q4_1/Q8_0 (as packed triples) near their size; the rest become float16
        decoded += nbytes if type_name in ("F32", "F16", "I8", "I16", "I32") else (
            numel // 2 + numel // 8 if type_name in ("Q4_0", "Q4_1") else
            numel + numel // 8 if type_name == "Q8_0" else 2 * numel)
    return decoded


def meta_value(v):
    if isinstance(v, mx.array):
        return v.item() if v.size == 1 else v.tolist()
    return v


def _config(meta: dict, weights: dict) -> dict:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}: supported are {', '.join(sorted(_ARCHS))}"
        )
    if "rope_freqs.weight" in weights:
        raise ValueError(
            "this GGUF stores Llama 3.1 rope frequencies (rope_freqs), which mlx-redrafter does not "
            "read: load the Hugging Face or mlx-lm checkpoint instead"
        )
    m = lambda key, default=None: meta_value(meta.get(f"{arch}.{key}", default))
    heads = m("attention.head_count")
    hidden = m("embedding_length")
    for key, value in (("attention.head_count", heads), ("embedding_length", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"metadata {arch}.{key} must be a positive integer, got {str(value)[:40]}")
    if "model.embed_tokens.weight" not in weights or weights["model.embed_tokens.weight"].ndim != 2:
        raise ValueError("no 2-D token_embd.weight tensor (the token embeddings)")
    config = {
        "model_type": _ARCHS[arch],
        "hidden_size": hidden,
        "num_hidden_layers": m("block_count"),
        "intermediate_size": m("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": m("attention.head_count_kv", heads),
        "head_dim": m("attention.key_length", hidden // heads),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m("rope.freq_base", 10000.0),
        "max_position_embeddings": m("context_length"),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    if m("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": m("rope.scaling.factor")}
    return config


def _rename(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if layer and layer.group(2) in _LAYER_NAMES:
        return f"model.layers.{layer.group(1)}.{_LAYER_NAMES[layer.group(2)]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    return name


def _unpermute(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order: rows (heads, D/2, 2) back to (heads, 2, D/2)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def quantization_of(weights: dict) -> dict:
    """mlx-lm style per-layer quantization config inferred from packed shapes."""
    per_layer = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        base = name[: -len(".scales")]
        packed = weights[f"{base}.weight"].shape[-1]
        bits = packed * 32 // (scales.shape[-1] * 32)
        per_layer[base] = {"group_size": 32, "bits": bits}
    if not per_layer:
        return {}
    first = next(iter(per_layer.values()))
    return {"group_size": first["group_size"], "bits": first["bits"], **per_layer}


def load_gguf(path: str) -> Tuple[Dict[str, mx.array], dict, dict]:
    """Return (weights in mlx-lm names, model config, raw metadata)."""
    check_gguf(path)  # before MLX's C reader sees a single byte
    try:
        raw, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:
        raise ValueError(f"could not read GGUF file {path} (truncated or corrupt?): {e}") from None
    weights = {_rename(k): v for k, v in raw.items()}
    try:
        config = _config(meta, weights)
        ModelArgs.from_dict(config)  # sizes in range before any reshaping
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        if config["model_type"] == "llama":
            for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
                for name in [k for k in weights if f"self_attn.{proj}." in k]:
                    weights[name] = _unpermute(weights[name], heads)
        quant = quantization_of(weights)
    except (ValueError, KeyError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: tensors do not fit its metadata ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if quant:
        config["quantization"] = quant
    return weights, config, meta

