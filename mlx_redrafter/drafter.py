"""The ReDrafter draft head: an RNN over drafted tokens feeding ResBlocks and an LM head.

Checkpoint-compatible with Apple's ReDrafter (same key names and shapes):

    s_0 = 0
    s_t = SiLU(rnn_w(e_t) + rnn_u(s_{t-1}))      (without rnn: s_t = s_{t-1} + e_t)
    x   = input_proj(concat([h, s_t]))            (input_proj only when 2H != E)
    x   = x + SiLU(lm_head.i.linear(x))           for i < L
    logits = lm_head.L(x)                         (V x E)

e_t is the base model's embedding of the last drafted token and h the base
model's last hidden state (after its final norm). Two variants for small base
models, set in config.json:

- shared_lm_head: no lm_head.L; logits = base model's LM head applied to x
  (needs exit_dim == hidden_size). Saves the V x E matrix.
- draft_vocab_size: lm_head.L is (Vd, E) over a reduced vocabulary and
  `draft_to_token` (Vd,) maps draft ids to token ids.

A drafter can be stored with 8-bit (or 4-bit) weight matrices to halve its
size on disk: each quantized matrix `k` is stored as MLX packs it (`k`
uint32, `k.scales`, `k.biases`), config.json gets mlx-lm's
"quantization": {"group_size", "bits"}, and loading expands them back, so
decoding runs in the usual float dtype.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

MODEL_TYPE = "recurrent_drafting_drafter"


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int
    rnn: bool = True
    shared_lm_head: bool = False
    draft_vocab_size: Optional[int] = None
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, d: dict) -> "DrafterConfig":
        names = {f.name for f in fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ValueError(f"drafter config.json is incomplete: {e}") from None
        if cfg.shared_lm_head and cfg.exit_dim != cfg.hidden_size:
            raise ValueError("a drafter with shared_lm_head needs exit_dim == hidden_size")
        return cfg

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def __call__(self, x):
        return x + nn.silu(self.linear(x))


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        H, E = config.hidden_size, config.exit_dim
        if 2 * H != E:
            self.input_proj = nn.Linear(2 * H, E)
        head = [ResBlock(E) for _ in range(config.num_draft_layers)]
        if not config.shared_lm_head:
            head.append(nn.Linear(E, config.draft_vocab, bias=False))
        self.lm_head = head
        if config.rnn:
            self.rnn_u = nn.Linear(H, H)
            self.rnn_w = nn.Linear(H, H, bias=False)
        if config.draft_vocab_size:
            self.draft_to_token = mx.arange(config.draft_vocab_size, dtype=mx.int32)
            self.freeze(keys=["draft_to_token"], recurse=False)

    def next_state(self, state: mx.array, embedding: mx.array) -> mx.array:
        """s_t from s_{t-1} (..., H) and the embedding of the token drafted last (..., H)."""
        if self.config.rnn:
            return nn.silu(self.rnn_w(embedding) + self.rnn_u(state))
        return state + embedding

    def __call__(self, hidden: mx.array, state: mx.array, base=None) -> mx.array:
        """Draft logits (..., Vd) from the base hidden state (..., H) and RNN state (..., H)."""
        hidden = mx.broadcast_to(hidden, state.shape)
        x = mx.concatenate([hidden, state], axis=-1)
        if "input_proj" in self:
            x = self.input_proj(x)
        for layer in self.lm_head:
            x = layer(x)
        if self.config.shared_lm_head:
            return base.logits(x)
        return x

    def to_token_ids(self, draft_ids: mx.array) -> mx.array:
        if self.config.draft_vocab_size:
            return self.draft_to_token[draft_ids]
        return draft_ids

    def check_base(self, base) -> None:
        """Refuse a base model this drafter was not made for."""
        args = base.args
        if (self.config.hidden_size, self.config.vocab_size) != (args.hidden_size, args.vocab_size):
            raise ValueError(
                f"drafter does not match the base model: drafter hidden_size={self.config.hidden_size}, "
                f"vocab_size={self.config.vocab_size}; base model hidden_size={args.hidden_size}, "
                f"vocab_size={args.vocab_size}; train or convert a drafter for this model"
            )


def init_drafter(config: DrafterConfig, base=None, draft_to_token: Optional[mx.array] = None) -> Drafter:
    """A fresh drafter; with a base model, checked against it."""
    drafter = Drafter(config)
    if draft_to_token is not None:
        drafter.draft_to_token = draft_to_token.astype(mx.int32)
    if base is not None:
        drafter.check_base(base)
    return drafter


QUANT_GROUP = 64


def quantize_weights(weights: dict, bits: int) -> dict:
    """Pack every 2-D float matrix whose rows split into groups of 64 (see module docstring)."""
    out = {}
    for k, v in weights.items():
        if v.ndim == 2 and mx.issubdtype(v.dtype, mx.floating) and v.shape[1] % QUANT_GROUP == 0:
            out[k], out[f"{k}.scales"], out[f"{k}.biases"] = mx.quantize(v, QUANT_GROUP, bits)
        else:
            out[k] = v
    return out


def dequantize_weights(weights: dict, quantization: dict) -> dict:
    packed = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    out = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    for k in packed:
        out[k] = mx.dequantize(weights[k], weights[f"{k}.scales"], weights[f"{k}.biases"],
                               quantization["group_size"], quantization["bits"])
    return out


def save_drafter(drafter: Drafter, path, dtype=None, extra_config: Optional[dict] = None,
                 bits: Optional[int] = None) -> Path:
    """Write config.json + model.safetensors into `path` atomically (outputs.atomic_output).

    An existing `path` is replaced only if this project wrote it (or it is empty).
    bits: store weight matrices quantized to 8 or 4 bits (module docstring).
    """
    from .outputs import atomic_output

    with atomic_output(path, force=True, what="drafter") as tmp:
        write_drafter_files(drafter, tmp, dtype, extra_config, bits)
    return Path(path)


def write_drafter_files(drafter: Drafter, directory, dtype=None, extra_config: Optional[dict] = None,
                        bits: Optional[int] = None):
    """config.json + model.safetensors into an existing (temporary) directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(drafter.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    if bits is not None:
        weights = quantize_weights(weights, bits)
        extra_config = {**(extra_config or {}), "quantization": {"group_size": QUANT_GROUP, "bits": bits}}
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {**asdict(drafter.config), **(extra_config or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def build_drafter(config: DrafterConfig, weights: dict, source: str, base=None) -> Drafter:
    """A drafter holding `weights` (strictly matched to `config`), checked against `base`."""
    drafter = Drafter(config)
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"drafter weights in {source} do not match its config: {e}".replace("\n", " ")) from None
    if base is not None:
        drafter.check_base(base)
    return drafter


def load_drafter(path, base=None, dtype=None) -> Drafter:
    """Load a drafter directory (config.json + *.safetensors); check it against `base`."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "drafter" / "config.json").exists():
        path = path / "drafter"  # a `mlx-redrafter train` output directory
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no drafter at {path}: expected config.json and model.safetensors there")
    raw_config = json.loads(config_file.read_text())
    config = DrafterConfig.from_dict(raw_config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"drafter {path} has no *.safetensors weights")
    from .loading import read_safetensors

    weights = read_safetensors(files)
    if raw_config.get("quantization"):
        weights = dequantize_weights(weights, raw_config["quantization"])
    drafter = build_drafter(config, weights, str(path), base)
    if base is not None:
        if dtype is None:
            dtype = base.model.norm.weight.dtype
    if dtype is not None:
        from .loading import cast

        cast(drafter, dtype)
    mx.eval(drafter.parameters())
    return drafter
