"""The ReDrafter draft head: an RNN over drafted tokens feeding ResBlocks and an LM head.

Checkpoint-compatible with Apple's ReDrafter (same key names and shapes):

    s_0 = 0
    s_t = SiLU(rnn_w(e_t) + rnn_u(s_{t-1}))      (without rnn: s_t = s_{t-1} + e_t)
    x   = input_proj(concat([h, s_t]))            (input_proj only when 2H != E)
    x   = x + SiLU(lm_head.i.linear(x))           for i < L
    logits = lm_head.L(x)                         (V x E)

e_t is the base model's embedding of the last drafted token and h the base
model's last hidden state (after its final norm). Three variants, set in config.json:

- feature_layers [i, j, ...] (this project's, EAGLE-3's idea): h is instead
  feature_proj(concat([rms(out_i), rms(out_j), ..., h])), the outputs of base layers
  i, j, ... (RMS-normalized) beside the last hidden state, (k + 1) H -> H. Lower
  layers still hold what the context's tokens were; the last one holds the next
  token's prediction. Not expressible in Apple's (or TensorRT-LLM's) layout.
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
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import validate as V
from .cuda_matmul import Linear, fused_linear

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
    feature_layers: Optional[List[int]] = None
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, d: dict, source: str = "drafter config.json") -> "DrafterConfig":
        if not isinstance(d, dict):
            raise ValueError(f"invalid drafter config {source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ValueError(f"{source} is incomplete: {e}") from None
        except ValueError as e:
            raise ValueError(str(e).replace("invalid drafter config:", f"invalid drafter config {source}:", 1)) from None

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "invalid drafter config") -> None:
        """Sizes in range (validate.py) and consistent, else one line naming the field."""
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"{where}: model_type is {V._show(self.model_type)}, not {MODEL_TYPE!r} (not a drafter)")
        vocab = V.integer(where, "vocab_size", self.vocab_size, 1, V.MAX_VOCAB)
        V.integer(where, "hidden_size", self.hidden_size, 1, V.MAX_HIDDEN)
        V.integer(where, "exit_dim", self.exit_dim, 1, V.MAX_HIDDEN)
        V.integer(where, "num_draft_layers", self.num_draft_layers, 0, V.MAX_DRAFT_LAYERS)
        V.boolean(where, "rnn", self.rnn)
        V.boolean(where, "shared_lm_head", self.shared_lm_head)
        V.optional_integer(where, "draft_vocab_size", self.draft_vocab_size, 1, vocab)
        if self.feature_layers is not None:
            layers = self.feature_layers
            if not isinstance(layers, list) or not 1 <= len(layers) <= 8:
                raise ValueError(f"{where}: feature_layers must be a list of 1 to 8 layer indices, got {V._show(layers)}")
            for i in layers:
                V.integer(where, "feature_layers[]", i, 0, V.MAX_LAYERS - 1)
            if layers != sorted(set(layers)):
                raise ValueError(f"{where}: feature_layers must be distinct and ascending, got {layers}")
        if self.shared_lm_head and self.exit_dim != self.hidden_size:
            raise ValueError("a drafter with shared_lm_head needs exit_dim == hidden_size")
        if self.shared_lm_head and self.draft_vocab_size:
            raise ValueError(f"{where}: shared_lm_head and draft_vocab_size exclude each other")

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, dim)

    def __call__(self, x):
        return fused_linear(self.linear, x, residual=x, silu=True)  # x + silu(linear(x))


class Drafter(nn.Module):
    """The ReDrafter draft head (module docstring). Made by `load_drafter` or `load(..., drafter=...)`.

    >>> model, tokenizer = mr.load()
    >>> model.drafter.config                # DrafterConfig(vocab_size=..., exit_dim=..., ...)
    """

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        H, E = config.hidden_size, config.exit_dim
        if 2 * H != E:
            self.input_proj = Linear(2 * H, E)
        head = [ResBlock(E) for _ in range(config.num_draft_layers)]
        if not config.shared_lm_head:
            head.append(Linear(E, config.draft_vocab, bias=False))
        self.lm_head = head
        if config.rnn:
            self.rnn_u = Linear(H, H)
            self.rnn_w = Linear(H, H, bias=False)
        if config.feature_layers:
            self.feature_proj = Linear((len(config.feature_layers) + 1) * H, H)
        if config.draft_vocab_size:
            self.draft_to_token = mx.arange(config.draft_vocab_size, dtype=mx.int32)
            self.freeze(keys=["draft_to_token"], recurse=False)

    @property
    def capture(self) -> Tuple[int, ...]:
        """The base layers whose outputs this drafter reads beside the last hidden state."""
        return tuple(self.config.feature_layers or ())

    def base_features(self, base, tokens: mx.array, cache=None, positions=None, mask=None):
        """One base-model forward: (hidden (B, n, H), features (B, n, F)), features what this
        drafter reads (`context`); F = H and features is hidden for Apple's layout."""
        if not self.capture:
            hidden = base(tokens, cache, positions, mask)
            return hidden, hidden
        return base(tokens, cache, positions, mask, capture=self.capture)

    def context(self, features: mx.array) -> mx.array:
        """The drafter's view of the base model (..., H) from `base_features`' features (..., F)."""
        return self.feature_proj(features) if "feature_proj" in self else features

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

    def check_base(self, base, source: str = "") -> None:
        """Refuse a base model this drafter was not made for."""
        check_config_against_base(self.config, base, source)
        check_token_table(self.config, self.draft_to_token if self.config.draft_vocab_size else None, source,
                          base.args.vocab_size)


def check_config_against_base(config: DrafterConfig, base, source: str = "") -> None:
    """The drafter's hidden and vocabulary sizes must be the base model's."""
    args = base.args
    if (config.hidden_size, config.vocab_size) != (args.hidden_size, args.vocab_size):
        name = f"drafter {source}" if source else "the drafter"
        raise ValueError(
            f"{name} was made for another model (drafter does not match the base model: drafter "
            f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}; base model "
            f"hidden_size={args.hidden_size}, vocab_size={args.vocab_size}): train or convert a drafter for this model"
        )
    if config.feature_layers and max(config.feature_layers) >= args.num_hidden_layers:
        name = f"drafter {source}" if source else "the drafter"
        raise ValueError(f"{name} reads base layer {max(config.feature_layers)}, but the base model has "
                         f"{args.num_hidden_layers} layers: train or convert a drafter for this model")


def check_token_table(config: DrafterConfig, table, source: str = "", vocab_size: Optional[int] = None) -> None:
    """A reduced-vocabulary drafter's draft id -> token id table must name distinct tokens of the vocabulary.

    An id past the base vocabulary would index past the embedding table in beam
    search (a crash, or garbage read from memory), so it is refused at load.
    """
    if table is None:
        return
    name = f"drafter {source}" if source else "the drafter"
    vocab = config.vocab_size if vocab_size is None else vocab_size
    if table.ndim != 1 or table.shape[0] != config.draft_vocab_size:
        raise ValueError(f"{name}: draft_to_token has shape {tuple(table.shape)}, expected ({config.draft_vocab_size},)")
    if not mx.issubdtype(table.dtype, mx.integer):
        raise ValueError(f"{name}: draft_to_token holds {table.dtype}, not integer token ids")
    low, high = mx.min(table).item(), mx.max(table).item()
    if low < 0 or high >= vocab:
        bad = high if high >= vocab else low
        raise ValueError(f"{name} was made for another model: its token table names token id {bad}, "
                         f"outside this vocabulary of {vocab} tokens; train or convert a drafter for this model")
    if len(np.unique(np.array(table))) != table.shape[0]:
        # equal draft tokens would give a tree node two equal children, which biases sampling
        raise ValueError(f"{name}: draft_to_token names a token more than once; each draft id must map to its own token")


def init_drafter(config: DrafterConfig, base=None, draft_to_token: Optional[mx.array] = None) -> Drafter:
    """A fresh drafter; with a base model, checked against it."""
    if base is not None:
        check_config_against_base(config, base)
    drafter = Drafter(config)
    if config.feature_layers:  # start as Apple's layout: the last hidden state passes through, other layers at 0
        H = config.hidden_size
        proj = drafter.feature_proj
        proj.weight = mx.concatenate([mx.zeros((H, proj.weight.shape[1] - H)), mx.eye(H)], axis=1)
        proj.bias = mx.zeros((H,))
    if draft_to_token is not None:
        check_token_table(config, draft_to_token)
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


def dequantize_weights(weights: dict, quantization: dict, source: str = "the drafter") -> dict:
    if not (isinstance(quantization, dict) and quantization.get("group_size") in (32, 64, 128)
            and quantization.get("bits") in (2, 3, 4, 5, 6, 8)):
        raise ValueError(f"{source}: config.json's quantization {V._show(quantization)} is not "
                         "{group_size: 32/64/128, bits: 2-8}")
    packed = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    out = {k: v for k, v in weights.items() if not k.endswith((".scales", ".biases"))}
    for k in packed:
        if k not in weights or f"{k}.biases" not in weights:
            raise ValueError(f"{source}: quantized weight {k} is missing its packed matrix or biases")
        try:
            out[k] = mx.dequantize(weights[k], weights[f"{k}.scales"], weights[f"{k}.biases"],
                                   quantization["group_size"], quantization["bits"])
        except ValueError as e:
            raise ValueError(f"{source}: quantized weight {k} is malformed: {e}".replace("\n", " ")) from None
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
    if base is not None:  # before the weights: a wrong model is the likelier story than a damaged file
        check_config_against_base(config, base, source)
    drafter = Drafter(config)
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"drafter weights in {source} do not match its config: {e}".replace("\n", " ")) from None
    check_token_table(config, drafter.draft_to_token if config.draft_vocab_size else None, source,
                      base.args.vocab_size if base is not None else None)
    return drafter


def read_config(config_file: Path) -> dict:
    """config.json as a dict; a malformed file is one line naming it."""
    from .validate import read_json_object

    return read_json_object(config_file, "a drafter config", "restore or re-create the drafter")


EMPTY_DRAFTER_PATH = "the drafter path is empty: name a drafter folder, or leave it out for the model's own"
AUTO = "auto"  # a model's own drafter: `model.drafter`


def drafter_from(model, drafter):
    """The drafter `drafter` names for `model`: "auto" is `model.drafter` (None where it has none), a
    folder (str or Path) is loaded, anything else (a Drafter, None) is returned as it is."""
    if isinstance(drafter, str) and drafter == AUTO:
        return getattr(model, "drafter", None)
    if isinstance(drafter, (str, Path)):
        return load_drafter(drafter, model)
    return drafter


def drafter_folder(path) -> Path:
    """The folder holding a drafter's config.json: `path`, or its drafter/ (a `mlx-redrafter train` output)."""
    path = Path(path).expanduser()
    if not (path / "config.json").exists() and (path / "drafter" / "config.json").exists():
        return path / "drafter"
    return path


def load_drafter(path, base=None, dtype=None) -> Drafter:
    """Load a drafter directory (config.json + *.safetensors); check it against `base`.

    dtype: the base model's by default. `load(path, drafter=DIR)` does this for you.

    >>> model, tokenizer = mr.load("path/to/model", drafter=None)
    >>> drafter = mr.load_drafter("path/to/drafter", model)
    >>> mr.generate(model, tokenizer, "Hi", drafter=drafter)   # or: model.drafter = drafter
    """
    if isinstance(path, str) and not path.strip():  # Path("") would be the working directory
        raise ValueError(EMPTY_DRAFTER_PATH)
    source = Path(path).expanduser()
    path = drafter_folder(source)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no drafter at {path}: expected config.json and model.safetensors there")
    raw_config = read_config(config_file)
    config = DrafterConfig.from_dict(raw_config, str(config_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"drafter {path} has no *.safetensors weights")
    from .loading import read_safetensors

    weights = read_safetensors(files)
    if raw_config.get("quantization"):
        weights = dequantize_weights(weights, raw_config["quantization"], str(path))
    drafter = build_drafter(config, weights, str(path), base)
    if base is not None:
        if dtype is None:
            dtype = base.model.norm.weight.dtype
    if dtype is not None:
        from .loading import cast

        cast(drafter, dtype)
    mx.eval(drafter.parameters())
    drafter.source = str(source)  # where it was loaded from, as given (names it in results)
    return drafter
