"""Export a drafter to what TensorRT-LLM's ReDrafter checkpoint converter reads.

TensorRT-LLM's `examples/redrafter/convert_checkpoint.py --drafter_model_dir D`
opens `D/config.json` (as a Namespace: `hidden_size`, `exit_dim`,
`num_draft_layers`, `rnn`) and `D/model.safetensors` with Apple's tensor names
(`input_proj.*` when 2H != E, `lm_head.{i}.linear.*`, `lm_head.{L}.weight`,
`rnn_u.*`, `rnn_w.weight`), casting each to its `--dtype` (float16 by default).
Its drafter's LM head is always the base model's full vocabulary (V x E), so
this project's two smaller heads are rewritten as an equivalent full head:

- shared head (logits = the base model's LM head applied to x, E = H): the base
  model's head matrix is written out as `lm_head.{L}.weight` (needs the base model).
- reduced vocabulary (Vd draft tokens and a draft id -> token id table): the
  drafter is widened by one constant coordinate (x_c = 1 from `input_proj`'s
  bias; every ResBlock leaves it at 1 since silu(0) = 0) plus zero padding to
  a multiple of 8; the full head copies each draft token's row to its token id
  and gives every other token the logit -1e4 through the constant coordinate.
  The drafted tokens' logits are the same numbers and the others' probability
  underflows to exactly 0 after log-softmax, so beam search drafts the same
  tokens (tested). The price: a V x E' head instead of Vd x E.

The result also loads back with `mlx-redrafter convert drafter` (tested).
"""

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .drafter import MODEL_TYPE, Drafter, DrafterConfig, build_drafter, load_drafter

FORMATS = ("trtllm",)
OUTSIDE_LOGIT = -1e4  # exp(-1e4) is 0 in every float type; representable exactly in float16


def head_matrix(base) -> mx.array:
    """The base model's LM head as a dense (V, H) matrix (the tied embedding when tied; quantized ones expanded)."""
    layer = base.model.embed_tokens if base.args.tie_word_embeddings else base.lm_head
    if "scales" in layer:
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
                             mode=getattr(layer, "mode", "affine"))
    return layer.weight


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def widened_exit_dim(config: DrafterConfig) -> int:
    """E' > E with room for the constant coordinate, a multiple of 8, never 2H (that would drop input_proj)."""
    wide = _round8(config.exit_dim + 1)
    return wide + 8 if wide == 2 * config.hidden_size else wide


def _pad(a: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def expand_reduced_head(config: DrafterConfig, weights: Dict[str, np.ndarray], table: np.ndarray):
    """A reduced-vocabulary drafter's weights as an equivalent full-vocabulary one (module docstring)."""
    H, E, L, V = config.hidden_size, config.exit_dim, config.num_draft_layers, config.vocab_size
    wide, const = widened_exit_dim(config), E
    out = {k: v for k, v in weights.items() if k.startswith("rnn_")}
    proj_w = weights.get("input_proj.weight", np.eye(2 * H, dtype=np.float32))  # E == 2H: identity
    proj_b = weights.get("input_proj.bias", np.zeros(2 * H, dtype=np.float32))
    out["input_proj.weight"] = _pad(proj_w, (wide, 2 * H))
    out["input_proj.bias"] = _pad(proj_b, (wide,))
    out["input_proj.bias"][const] = 1.0
    for i in range(L):
        out[f"lm_head.{i}.linear.weight"] = _pad(weights[f"lm_head.{i}.linear.weight"], (wide, wide))
        out[f"lm_head.{i}.linear.bias"] = _pad(weights[f"lm_head.{i}.linear.bias"], (wide,))
    head = np.zeros((V, wide), dtype=np.float32)
    head[:, const] = OUTSIDE_LOGIT
    head[table, const] = 0.0
    head[table, :E] = weights[f"lm_head.{L}.weight"]
    out[f"lm_head.{L}.weight"] = head
    return replace(config, exit_dim=wide, draft_vocab_size=None), out


def full_head(drafter: Drafter, base=None) -> Tuple[DrafterConfig, Dict[str, mx.array]]:
    """The drafter as a plain Apple-layout one (own V x E head), its weights in float32."""
    config = drafter.config
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(drafter.parameters()) if k != "draft_to_token"}
    if config.shared_lm_head:
        if base is None:
            raise ValueError("this drafter uses the base model's LM head: pass --base M (the model it was "
                             "trained for) so the head can be written out")
        weights[f"lm_head.{config.num_draft_layers}.weight"] = head_matrix(base).astype(mx.float32)
        return replace(config, shared_lm_head=False), weights
    if config.draft_vocab_size:
        table = np.array(drafter.draft_to_token)
        config, wide = expand_reduced_head(config, {k: np.array(v) for k, v in weights.items()}, table)
        return config, {k: mx.array(v) for k, v in wide.items()}
    return config, weights


def trtllm_config(config: DrafterConfig, dtype: str) -> dict:
    """config.json in Apple's drafter fields (what the converter and `convert drafter` read)."""
    return {"model_type": MODEL_TYPE, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "exit_dim": config.exit_dim, "num_draft_layers": config.num_draft_layers, "rnn": config.rnn,
            "torch_dtype": dtype}


def export_drafter(src, out, fmt: str = "trtllm", base=None, dtype: str = "float16", force: bool = False) -> Path:
    """Write DRAFTER as TensorRT-LLM's ReDrafter converter reads it: OUT/config.json + OUT/model.safetensors."""
    import json

    from .convert import output_dtype
    from .outputs import atomic_output, prepare_output

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    target = output_dtype(dtype)
    prepare_output(out, force, [src])  # refuse before any work
    drafter = load_drafter(src, base, dtype=mx.float32)
    if drafter.config.feature_layers:
        raise ValueError(f"drafter {src} reads base layers {drafter.config.feature_layers} beside the last hidden "
                         "state (feature_layers), which TensorRT-LLM's ReDrafter cannot feed it: export a drafter "
                         "trained without --feature-layers")
    config, weights = full_head(drafter, base)
    build_drafter(config, weights, str(src))  # the written keys and shapes are exactly an Apple drafter's
    weights = {k: v.astype(target) for k, v in weights.items()}
    with atomic_output(out, force, [src], "export trtllm", {"source": str(src)}) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(trtllm_config(config, dtype), indent=2))
    return Path(out)
