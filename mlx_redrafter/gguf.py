"""Read a llama.cpp GGUF file: weights under mlx-lm names, config and tokenizer.

`mx.load` parses GGUF itself. Q4_0/Q4_1/Q8_0 tensors arrive as MLX quantized
triples (weight uint32, scales, biases; group size 32) and stay quantized;
other types arrive as float16. llama.cpp permutes the q/k rows of Llama models
for its interleaved RoPE; `_unpermute` restores the Hugging Face order.
"""

import re
from typing import Dict, Tuple

import mlx.core as mx

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

# llama.cpp's pre-tokenizer regexes for byte-level BPE vocabularies.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_TOKENIZERS = {
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "default": [_GPT2],
}


def _meta_value(v):
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
    m = lambda key, default=None: _meta_value(meta.get(f"{arch}.{key}", default))
    heads = m("attention.head_count")
    hidden = m("embedding_length")
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
    try:
        raw, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:
        raise ValueError(f"could not read GGUF file {path} (truncated or corrupt?): {e}") from None
    weights = {_rename(k): v for k, v in raw.items()}
    config = _config(meta, weights)
    if config["model_type"] == "llama":
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            for name in [k for k in weights if f"self_attn.{proj}." in k]:
                weights[name] = _unpermute(weights[name], heads)
    quant = quantization_of(weights)
    if quant:
        config["quantization"] = quant
    return weights, config, meta


def build_tokenizer(meta: dict):
    """A transformers fast tokenizer built from GGUF metadata (byte-level BPE vocabularies)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'): "
            "pass a Hugging Face model directory instead"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    regexes = _PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre", "default"), _PRE_TOKENIZERS["default"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    types = _meta_value(meta.get("tokenizer.ggml.token_type")) or []
    special = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # control, user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[_meta_value(i)] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
