"""Convert PyTorch checkpoints to MLX: Hugging Face Llama-family models and ReDrafter drafters.

Base models are converted shard by shard (peak memory near the largest
shard); drafters are renamed from Apple's or TensorRT-LLM's key layout. The
output is written with outputs.atomic_output: OUT may not be (or hold) the
source, the current directory, home or root; an existing OUT is replaced only
with force=True and only if this project wrote it (or it is empty); a failure
or a signal leaves nothing half-written.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from .drafter import MODEL_TYPE, DrafterConfig, build_drafter, write_drafter_files
from .llama import ModelArgs
from .outputs import atomic_output, prepare_output
from .progress import progress as progress_bar
from .torch_pickle import load_torch_checkpoint, to_mlx
from .validate import check_safetensors, read_json_object

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def output_dtype(dtype: str) -> mx.Dtype:
    """The MLX dtype for a --dtype name; an unknown name is one line listing the accepted ones."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def weight_shards(src: Path) -> List[Path]:
    """The checkpoint's weight files: safetensors preferred, else PyTorch .bin shards."""
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in src.glob(pattern) if not p.name.endswith(".index.json"))
        if files:
            return files
    raise FileNotFoundError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin")


def read_shard(path: Path) -> Dict[str, mx.array]:
    if path.suffix == ".safetensors":
        check_safetensors(path)  # before MLX's C++ reader sees the header
        try:
            return mx.load(str(path))
        except Exception as e:
            raise ValueError(f"could not read {path} (truncated or corrupt?): {e}") from None
    state = load_torch_checkpoint(path)
    # pop as we go: each storage's bytes are freed once copied, so a shard is held about once
    return {k: to_mlx(state.pop(k)) for k in list(state)}


def _check_index(src: Path, shards: List[Path]):
    for index in src.glob("*.index.json"):
        weight_map = read_json_object(index, "a weight index", "restore or re-download the model").get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        listed = set(weight_map.values())
        missing = sorted(listed - {p.name for p in shards})
        if missing:
            raise FileNotFoundError(f"{index.name} lists {missing[0]}, which is not in {src}")


def quantize_weights(weights: Dict[str, mx.array], group_size: int, bits: int, per_layer: dict) -> Dict[str, mx.array]:
    """mlx-lm style affine quantization of every 2-D weight (linear layers and embeddings)."""
    out = {}
    for name, w in weights.items():
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and w.ndim == 2 and "norm" not in name:
            if w.shape[-1] % group_size:
                per_layer[layer] = False
                out[name] = w
                continue
            out[name], out[f"{layer}.scales"], out[f"{layer}.biases"] = mx.quantize(w, group_size, bits)
        else:
            out[name] = w
    return out


def convert_base(src, out, dtype: str = "float16", quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
                 force: bool = False, progress: bool = True) -> Path:
    """A Hugging Face Llama-family checkpoint directory -> an MLX directory (mlx-lm layout)."""
    src = Path(src)
    target_dtype = output_dtype(dtype)
    prepare_output(out, force, [src])  # refuse before any work
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: is it a Hugging Face model directory?")
    config = read_json_object(src / "config.json", "a model config", "restore or re-download the model")
    args = ModelArgs.from_dict(config)  # refuses unknown architectures
    shards = weight_shards(src)
    _check_index(src, shards)
    per_layer: dict = {}
    with atomic_output(out, force, [src], "convert base", {"source": str(src)}) as tmp:
        weight_map = {}
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard, name in zip(progress_bar(shards, progress, desc="converting", unit="shard"), names):
            weights = {k: v.astype(target_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                       for k, v in read_shard(shard).items() if "rotary_emb.inv_freq" not in k}
            if args.tie_word_embeddings:
                weights.pop("lm_head.weight", None)
            if quantize:
                weights = quantize_weights(weights, q_group_size, q_bits, per_layer)
            mx.save_safetensors(str(tmp / name), weights, metadata={"format": "mlx"})
            weight_map.update({k: name for k in weights})
            del weights
            mx.clear_cache()  # return the shard's buffers instead of pooling them
        if quantize:
            config["quantization"] = {"group_size": q_group_size, "bits": q_bits, **per_layer}
        config["torch_dtype"] = dtype
        rope = config.get("rope_parameters") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]  # flat, as mlx-lm's Qwen2/Llama configs expect
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        _validate(tmp, config, src)
    return Path(out)


def _validate(path: Path, config: dict, src: Path):
    """Every parameter the model needs is present with the right shape (the error names the source)."""
    from .loading import build_model, read_safetensors

    build_model(config, read_safetensors(sorted(path.glob("model-*.safetensors"))), f"{src} (with its config.json)")


# ---- drafters ----

_PREFIXES = [(r"^(module\.|drafter\.|model\.)+", ""), (r"^input_projs\.(\d+\.)?", "input_proj."),
             (r"^lm_heads\.", "lm_head."), (r"^0\.(\d+)\.", r"lm_head.\1.")]


def drafter_key(key: str) -> str:
    """Apple's / TensorRT-LLM's drafter key -> this project's (same as Apple's)."""
    for pattern, repl in _PREFIXES:
        key = re.sub(pattern, repl, key)
    return key


def infer_drafter_config(weights: Dict[str, mx.array]) -> DrafterConfig:
    """Drafter config from weight shapes, for checkpoints without config.json."""
    blocks = sorted({int(m.group(1)) for k in weights if (m := re.match(r"lm_head\.(\d+)\.linear\.weight$", k))})
    L = len(blocks)
    head = weights.get(f"lm_head.{L}.weight")
    if head is None:
        raise ValueError(f"drafter weights have no lm_head.{L}.weight (the V x E head after {L} ResBlocks)")
    V, E = head.shape
    if "rnn_u.weight" in weights:
        H = weights["rnn_u.weight"].shape[0]
    elif "input_proj.weight" in weights:
        H = weights["input_proj.weight"].shape[1] // 2
    else:
        H = E // 2
    return DrafterConfig(vocab_size=V, hidden_size=H, exit_dim=E, num_draft_layers=L, rnn="rnn_w.weight" in weights)


def read_drafter_weights(src: Path) -> Dict[str, mx.array]:
    files = [src] if src.is_file() else weight_shards(src)
    weights = {}
    for f in files:
        weights.update(read_shard(f))
    return {drafter_key(k): v for k, v in weights.items()}


def convert_drafter(src, out, base=None, dtype: str = "float16", force: bool = False) -> Path:
    """An Apple ReDrafter PyTorch drafter (dir or file) -> this project's drafter directory."""
    src = Path(src)
    target_dtype = output_dtype(dtype)
    if not src.exists():
        raise FileNotFoundError(f"no drafter checkpoint at {src}")
    prepare_output(out, force, [src])  # refuse before any work
    weights = read_drafter_weights(src)
    config_file = (src if src.is_dir() else src.parent) / "config.json"
    if config_file.exists():
        raw = read_json_object(config_file, "a drafter config", "restore or re-download the drafter")
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{config_file} is not a drafter config (model_type {raw.get('model_type')!r})")
        config = DrafterConfig.from_dict(raw)
    else:
        config = infer_drafter_config(weights)
    drafter = build_drafter(config, weights, str(src), base)
    with atomic_output(out, force, [src], "convert drafter", {"source": str(src)}) as tmp:
        write_drafter_files(drafter, tmp, dtype=target_dtype)
    return Path(out)
