"""Read PyTorch checkpoints (.bin / .pt) without torch and without running pickle code.

torch.save writes a zip archive: `<name>/data.pkl` pickles the state dict,
and each tensor storage is the raw file `<name>/data/<key>`. The unpickler
below resolves only the globals that rebuild tensors and containers
(_rebuild_tensor_v2, _rebuild_parameter, the *Storage types, OrderedDict) to
local functions; any other global (os.system, builtins.eval, ...) is refused
before anything is called. Tensors come back as numpy arrays (bfloat16 as
`BF16Array`, a uint16 view) honouring storage offset, sizes and strides;
tensors sharing a storage share its bytes.
"""

import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


# Tensors whose elements outnumber their storage's (zero or overlapping strides,
# i.e. broadcasts) are materialized by the copy below; real checkpoints hold at
# most a small one (an expanded position_ids buffer). Beyond this, refuse.
MAX_BROADCAST_BYTES = 64 << 20
MAX_DIMS = 16
# All tensors together may take at most this many times the checkpoint's size
# (+ MAX_BROADCAST_BYTES): tied weights appear twice, never hundreds of times.
MAX_EXPANSION = 4


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    pass


class BF16Array(np.ndarray):
    """A bfloat16 tensor held as its raw uint16 bits."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """One storage's bytes, as persistent_load found them in the archive."""

    def __init__(self, key: str, data: np.ndarray, is_bf16: bool):
        self.key, self.data, self.is_bf16 = key, data, is_bf16


def _ints(value, what: str) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise ValueError(f"{what} is not a list of at most {MAX_DIMS} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} holds something other than integers")
    return tuple(value)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
}
_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, budget: int):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: Dict[str, _Storage] = {}
        self.budget = budget  # bytes all tensors together may still take

    def find_class(self, module, name):
        if (module, name) in _REBUILD_TENSOR:
            return self.rebuild_tensor
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it references {module}.{name}, which is not a tensor "
            f"(the file may run code when unpickled; re-save it as safetensors if you trust it)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], (str, int))):
            raise UnsafeCheckpointError(f"refusing to load {self.source}: unexpected persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}" if self.prefix else f"data/{key}"
            try:
                raw = self.archive.read(name)  # size bounded by the checks in load_torch_checkpoint
            except KeyError:
                raise ValueError(f"{self.source} is missing tensor data {key} (truncated checkpoint?)") from None
            if len(raw) > self.budget:
                raise ValueError(f"{self.source}: storage {key} takes more bytes than the file holds (crafted archive?)")
            self.budget -= len(raw)
            itemsize = np.dtype(storage_type.dtype).itemsize
            if len(raw) % itemsize:
                raise ValueError(f"{self.source}: storage {key} holds {len(raw)} bytes, not a whole number of "
                                 f"{storage_type.name} elements (corrupt checkpoint?)")
            data = np.frombuffer(raw, dtype=storage_type.dtype)
            self.storages[key] = _Storage(key, data, storage_type.name == "BFloat16Storage")
        elif self.storages[key].data.dtype != storage_type.dtype:
            raise ValueError(f"{self.source}: storage {key} is declared with two different types")
        return self.storages[key]

    def rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        """A numpy view (or copy) of a storage, after checking every number the pickle declares."""
        if not isinstance(storage, _Storage):
            raise ValueError(f"{self.source}: a tensor is built from something that is not a storage")
        where = f"{self.source}: a tensor on storage {storage.key}"
        (offset,) = _ints(offset, f"{where}: its storage offset")
        size, stride = _ints(size, f"{where}: its size"), _ints(stride, f"{where}: its stride")
        if len(size) != len(stride):
            raise ValueError(f"{where} has {len(size)} sizes but {len(stride)} strides")
        if offset < 0 or any(s < 0 for s in size) or any(st < 0 for st in stride):
            raise ValueError(f"{where} declares a negative size, stride or offset "
                             f"(size {size}, stride {stride}, offset {offset}): corrupt or crafted checkpoint")
        data, available = storage.data, storage.data.size
        itemsize = data.dtype.itemsize
        numel = math.prod(size)  # Python ints: no overflow
        end = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride)) if numel else offset
        if end > available:
            raise ValueError(f"{where} (size {size}, stride {stride}, offset {offset}) reaches element {end} "
                             f"of a storage of {available} (truncated or crafted checkpoint?)")
        nbytes = numel * itemsize
        if numel > available and nbytes > MAX_BROADCAST_BYTES:
            raise ValueError(f"{where} repeats a storage of {available} elements as {numel} "
                             f"(zero or overlapping strides {stride}): refusing to expand it")
        if nbytes > self.budget:
            raise ValueError(f"{self.source} declares more tensor data than it holds (tensors reuse the "
                             f"same bytes many times): refusing to expand it")
        self.budget -= nbytes
        if not size:
            out = data[offset: offset + 1].reshape(()).copy()
        elif list(stride) == [math.prod(size[i + 1:]) for i in range(len(size))]:
            out = data[offset: offset + numel].reshape(size)  # contiguous: a view, no copy
        else:
            out = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                                  strides=[st * itemsize for st in stride]).copy()
        return out.view(BF16Array) if storage.is_bf16 else out


def load_torch_checkpoint(path) -> Dict[str, np.ndarray]:
    """The state dict of a torch.save zip file, as numpy arrays, executing no pickle code.

    Every tensor's size, stride and offset are checked against its storage before
    anything is copied, and all tensors together may take at most MAX_EXPANSION
    times the file's size (+ MAX_BROADCAST_BYTES); anything else is a ValueError.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch zip checkpoint (truncated, or the legacy pre-1.6 format): "
            "re-save it with a recent torch or as safetensors"
        )
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                # torch.save stores members uncompressed; a member unpacking past the
                # file's own size is a zip bomb, not a checkpoint
                if info.file_size > file_size:
                    raise ValueError(f"{path}: member {info.filename[:80]} unpacks to {info.file_size} bytes, "
                                     f"more than the {file_size}-byte file (crafted archive?)")
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ValueError(f"{path} has no data.pkl: not a torch.save checkpoint")
            prefix = pkl.rsplit("/", 1)[0] if "/" in pkl else ""
            budget = MAX_EXPANSION * file_size + MAX_BROADCAST_BYTES
            with archive.open(pkl) as f:
                state = _SafeUnpickler(f, archive, prefix, str(path), budget).load()
    except UnsafeCheckpointError:
        raise
    except ValueError as e:  # ours name the file already
        message = str(e).replace("\n", " ")[:300]
        raise ValueError(message if str(path) in message else f"could not read {path}: {message}") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"could not read {path} (truncated or corrupt?): {e}") from None
    except MemoryError:
        raise ValueError(f"could not read {path}: out of memory (is it a crafted checkpoint?)") from None
    except Exception as e:  # a malformed pickle: TypeError, IndexError, struct.error, RecursionError, ...
        raise ValueError(f"could not read {path}: malformed checkpoint ({type(e).__name__}: {e})"
                         .replace("\n", " ")[:300]) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, np.ndarray)}


def to_mlx(array: np.ndarray):
    """numpy (or BF16Array) to an mx.array of the same dtype."""
    import mlx.core as mx

    if isinstance(array, BF16Array):
        return mx.array(np.asarray(array).view(np.uint16)).view(mx.bfloat16)
    return mx.array(np.asarray(array))
