"""The Llama family in MLX: Llama 1/2/3, Vicuna, Mistral, Qwen2/2.5, Qwen3, SmolLM.

Parameter names equal mlx-lm's, so mlx-lm checkpoints (quantized too) load
as they are. Unlike mlx-lm the forward takes explicit per-token positions and
an optional attention mask, which tree verification needs, and returns the
final-norm hidden states; `logits` maps only the rows the caller asks for.

    model = Model(ModelArgs.from_dict(config))
    cache = model.make_cache()
    h = model(mx.array([[1, 2, 3]]), cache)      # (1, 3, H) written at slots 0..2 (cache.allocate)
    logits = model.logits(h[:, -1:])              # (1, 1, V)
"""

import itertools
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from . import validate as V
from .cuda_matmul import Linear, fused_linear, qkv_rope
from .kv_cache import KVCache, LayerKV

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2", "vicuna")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        if not isinstance(config, dict):
            raise ValueError(f"invalid model config: expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported architecture {model_type!r}: mlx-redrafter runs the Llama family "
                f"({', '.join(SUPPORTED)})"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        args = {k: v for k, v in config.items() if k in names}
        rope = config.get("rope_parameters") or {}  # transformers >= 5 nests these
        if not isinstance(rope, dict):
            raise ValueError(f"invalid model config: rope_parameters must be an object, got {V._show(rope)}")
        default_theta = 1e6 if model_type == "qwen2" else 10000.0  # mlx-lm's defaults
        args.setdefault("rope_theta", rope.get("rope_theta", default_theta))
        if args.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            args["rope_scaling"] = rope
        if model_type == "qwen2":  # Qwen2 always has q/k/v biases
            args["attention_bias"] = True
        try:
            return cls(**args, extra={k: v for k, v in config.items() if k not in names})
        except TypeError as e:
            raise ValueError(f"config.json is missing required fields: {e}") from None

    def __post_init__(self):
        self.validate()
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, where: str = "invalid model config") -> None:
        """Refuse absurd or inconsistent sizes with one line naming the field (bounds: validate.py)."""
        hidden = V.integer(where, "hidden_size", self.hidden_size, 1, V.MAX_HIDDEN)
        V.integer(where, "num_hidden_layers", self.num_hidden_layers, 1, V.MAX_LAYERS)
        V.integer(where, "intermediate_size", self.intermediate_size, 1, V.MAX_INTERMEDIATE)
        heads = V.integer(where, "num_attention_heads", self.num_attention_heads, 1, V.MAX_HEADS)
        V.integer(where, "vocab_size", self.vocab_size, 1, V.MAX_VOCAB)
        kv = V.optional_integer(where, "num_key_value_heads", self.num_key_value_heads, 1, heads)
        if kv is not None and heads % kv:
            raise ValueError(f"{where}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}")
        if V.optional_integer(where, "head_dim", self.head_dim, 1, V.MAX_HEAD_DIM) is None:
            if hidden % heads:
                raise ValueError(f"{where}: hidden_size = {hidden} is not divisible by num_attention_heads = {heads}")
            V.integer(where, "head_dim (hidden_size / num_attention_heads)", hidden // heads, 1, V.MAX_HEAD_DIM)
        V.optional_integer(where, "max_position_embeddings", self.max_position_embeddings, 1, V.MAX_POSITIONS)
        V.number(where, "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, low_open=True)
        V.number(where, "rope_theta", self.rope_theta, 0.0, 1e12, low_open=True)
        for name in ("rope_traditional", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            V.boolean(where, name, getattr(self, name))
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"{where}: rope_scaling must be an object or null, got {V._show(self.rope_scaling)}")
            if "factor" in self.rope_scaling:
                V.number(where, "rope_scaling.factor", self.rope_scaling["factor"], 0.0, 1e6, low_open=True)


def apply_rope(rope: nn.Module, x: mx.array, positions: Union[int, mx.array]) -> mx.array:
    """Rotate x (B, n, heads, D) by positions, an int offset or a (B, n) array: (B, heads, n, D)."""
    if isinstance(positions, int):
        return rope(x.transpose(0, 2, 1, 3), offset=positions)
    B, n, H, D = x.shape
    # mx.fast.rope takes one offset per batch row: fold the tokens into the batch (a free reshape here)
    rotated = rope(x.reshape(B * n, H, 1, D), offset=positions.reshape(-1))
    return rotated.reshape(B, n, H, D).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, dim, bias=bias and args.model_type != "qwen2")
        if args.model_type == "qwen3":
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            hd, args.rope_theta, args.rope_traditional, args.rope_scaling, args.max_position_embeddings
        )

    def __call__(self, x, positions, mask, cache: Optional[LayerKV], start: int, norm: nn.RMSNorm):
        """residual x + attention over norm(x) (cuda_matmul.fused_linear: one launch each side where it fits)."""
        B, n, _ = x.shape
        fused = None
        if "qkv_proj" in self and "q_norm" not in self:  # one launch for all of it where the kernel runs
            fused = qkv_rope(self.qkv_proj, x, norm, self.rope, positions, self.n_heads, self.n_kv_heads)
        q, k, v = fused or self._qkv(x, positions, norm)
        if cache is not None:
            k, v = cache.write(k, v, start, mask.shape[-1] if isinstance(mask, mx.array) else None)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return fused_linear(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, n, -1), residual=x)

    def _qkv(self, x, positions, norm):
        """q (B, heads, n, D), k and v (B, kv heads, n, D): projections, q/k norms (Qwen3), RoPE."""
        B, n, _ = x.shape
        if "qkv_proj" in self:  # fuse_projections: one matmul, then views of its heads
            qkv = fused_linear(self.qkv_proj, x, norm).reshape(B, n, self.n_heads + 2 * self.n_kv_heads, -1)
            q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=2)
        else:
            normed = norm(x)
            q = self.q_proj(normed).reshape(B, n, self.n_heads, -1)
            k = self.k_proj(normed).reshape(B, n, self.n_kv_heads, -1)
            v = self.v_proj(normed).reshape(B, n, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(self.rope, q, positions), apply_rope(self.rope, k, positions), v.transpose(0, 2, 1, 3)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)

    def __call__(self, x, norm: nn.RMSNorm):
        """residual x + the MLP of norm(x), as `Attention`."""
        if "gate_up_proj" in self:  # fuse_projections
            hidden = fused_linear(self.gate_up_proj, x, norm, glu=True)
        else:
            normed = norm(x)
            hidden = nn.silu(self.gate_proj(normed)) * self.up_proj(normed)
        return fused_linear(self.down_proj, hidden, residual=x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, positions, mask, cache, start):
        h = self.self_attn(x, positions, mask, cache, start, self.input_layernorm)
        return self.mlp(h, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """The base model (mlx-lm's parameter names). `load()` also sets two plain attributes:

    config: the config dict the model was built from (mlx-lm's `return_config` value);
    drafter: the ReDrafter `Drafter` that `generate` uses by default (None: plain decoding).

    Neither is a child module: a drafter attached here stays outside `model.parameters()`,
    so saving, casting, counting and training see the base model alone.

    >>> model, tokenizer = mlx_redrafter.load()
    >>> model.drafter, model.config["model_type"]
    """

    _PLAIN_ATTRIBUTES = ("drafter", "config")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.drafter = None
        self.config = None
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __setattr__(self, key, value):
        if key in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, key, value)  # not a child module (class docstring)
        else:
            super().__setattr__(key, value)

    def __call__(
        self,
        tokens: mx.array,
        cache: Optional[KVCache] = None,
        positions: Optional[mx.array] = None,
        mask: Optional[Union[mx.array, str]] = None,
        capture: Sequence[int] = (),
    ):
        """Hidden states after the final norm for tokens (B, n): shape (B, n, H).

        The new K/V are written at the n slots the cache hands out (`allocate`);
        the forward moves no counter of its own. positions (B, n) defaults to
        the first slot + arange(n) (plain decoding, where slots are positions);
        mask (additive or boolean, broadcastable to (B, heads, n, S)) defaults to
        causal; an array mask's width S >= first slot + n sets how many cache
        slots are attended (slots past the new tokens must be masked out).

        capture: layer indices whose outputs a multi-layer drafter reads; then the return value
        is (hidden, features), features (B, n, (len(capture) + 1) * H) = each captured layer's
        output RMS-normalized (no weight), then the final hidden state (`drafter.base_features`).
        """
        start = cache.allocate(tokens.shape[1]) if cache is not None else 0
        pos = start if positions is None else positions
        if mask is None and tokens.shape[1] > 1:
            mask = "causal"
        h = self.model.embed_tokens(tokens)
        if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
            mask = mx.where(mask, 0.0, -mx.inf).astype(h.dtype)  # once, not in every layer
        layer_caches = cache.layers if cache is not None else [None] * len(self.model.layers)
        captured = []
        for i, (layer, layer_cache) in enumerate(zip(self.model.layers, layer_caches)):
            h = layer(h, pos, mask, layer_cache, start)
            if i in capture:
                captured.append(mx.fast.rms_norm(h, None, self.args.rms_norm_eps))
        h = self.model.norm(h)
        return (h, mx.concatenate(captured + [h], axis=-1)) if capture else h

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def make_cache(self) -> KVCache:
        return KVCache(len(self.model.layers))

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


# fuse_projections: the fused module's name -> the mlx-lm modules it joins, in row order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(model: Model) -> None:
    """Join each layer's q/k/v and gate/up projections into one matmul each (5 a layer, not 7).

    Where a forward's cost is kernel launches (a small model on a GPU: a 38-row verify's
    projections took 5.8 ms as seven matmuls a layer and 4.8 ms as five on the H200), fewer and
    wider matmuls are faster; the outputs are the same rows, so results equal the unfused model's.
    Projections stored differently (quantized with other bits, one with a bias and one without)
    stay apart. `mlx_lm_weights` gives the parameters back under mlx-lm's names.
    """
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, parts in FUSED.items():
                if all(p in parent for p in parts):
                    joined = _join([parent[p] for p in parts])
                    if joined is not None:
                        for p in parts:
                            parent.pop(p)
                        parent[name] = joined


def _join(linears: list) -> Optional[nn.Module]:
    first = linears[0]
    kind, keys = type(first), set(first.keys())
    if kind not in (nn.Linear, Linear, nn.QuantizedLinear) or any(type(m) is not kind or set(m.keys()) != keys for m in linears):
        return None
    rows = sum(m.weight.shape[0] for m in linears)
    if kind is nn.QuantizedLinear:
        if any((m.group_size, m.bits, m.mode) != (first.group_size, first.bits, first.mode) for m in linears):
            return None
        joined = nn.QuantizedLinear(first.group_size, 1, "bias" in keys, first.group_size, first.bits, mode=first.mode)
    else:
        joined = kind(1, 1, bias="bias" in keys)
    joined.update({k: mx.concatenate([m[k] for m in linears], axis=0) for k in keys})
    assert joined.weight.shape[0] == rows
    return joined


def mlx_lm_weights(model: Model) -> Dict[str, mx.array]:
    """The parameters under mlx-lm's names: fused projections split back into their parts (views)."""
    from mlx.utils import tree_flatten

    args = model.args
    rows = {"qkv_proj": [args.num_attention_heads * args.head_dim] + [args.num_key_value_heads * args.head_dim] * 2,
            "gate_up_proj": [args.intermediate_size] * 2}
    out = {}
    for name, value in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        parent, _, fused = module.rpartition(".")
        if fused not in FUSED:
            out[name] = value
            continue
        offsets = list(itertools.accumulate(rows[fused]))[:-1]
        for part, piece in zip(FUSED[fused], mx.split(value, offsets, axis=0)):
            out[f"{parent}.{part}.{leaf}"] = piece
    return out


def mlx_lm_module_names(names) -> list:
    """Module paths under mlx-lm's names (a fused path stands for each of its parts)."""
    out = []
    for name in names:
        parent, _, last = name.rpartition(".")
        out += [f"{parent}.{p}" for p in FUSED[last]] if last in FUSED else [name]
    return out


def mlx_lm_quantization(model: Model) -> dict:
    """{mlx-lm module path: its quantization (group_size, bits, mode)} for `nn.quantize`'s class_predicate."""
    return {part: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode} for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for part in mlx_lm_module_names([name])}


def quantize_like(target: nn.Module, quantization: dict) -> None:
    """Quantize target's modules named in `mlx_lm_quantization`'s result, each as given there."""
    if quantization:
        first = next(iter(quantization.values()))
        nn.quantize(target, first["group_size"], first["bits"], class_predicate=lambda p, m: quantization.get(p, False))
