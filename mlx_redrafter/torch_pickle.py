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


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


class BF16Array(np.ndarray):
    """A bfloat16 tensor held as its raw uint16 bits."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    data, is_bf16 = storage
    itemsize = data.dtype.itemsize
    if len(size) == 0:
        out = data[offset: offset + 1].reshape(()).copy()
    else:
        needed = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset
        if needed > data.size:
            raise ValueError("a tensor reaches past the end of its storage (truncated checkpoint?)")
        numel = int(np.prod(size))
        contiguous = list(stride) == [int(np.prod(size[i + 1:])) for i in range(len(size))]
        if contiguous:  # a view: no copy of the (possibly large) storage
            out = data[offset: offset + numel].reshape(tuple(size))
        else:
            out = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size), strides=[s * itemsize for s in stride]).copy()
    return out.view(BF16Array) if is_bf16 else out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: Dict[str, tuple] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it references {module}.{name}, which is not a tensor "
            f"(the file may run code when unpickled; re-save it as safetensors if you trust it)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"refusing to load {self.source}: unexpected persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise ValueError(f"{self.source} is missing tensor data {key} (truncated checkpoint?)") from None
            data = np.frombuffer(raw, dtype=storage_type.dtype)
            self.storages[key] = (data, storage_type.name == "BFloat16Storage")
        return self.storages[key]


def load_torch_checkpoint(path) -> Dict[str, np.ndarray]:
    """The state dict of a torch.save zip file, as numpy arrays, executing no pickle code."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch zip checkpoint (truncated, or the legacy pre-1.6 format): "
            "re-save it with a recent torch or as safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ValueError(f"{path} has no data.pkl: not a torch.save checkpoint")
            prefix = pkl.rsplit("/", 1)[0] if "/" in pkl else ""
            with archive.open(pkl) as f:
                state = _SafeUnpickler(f, archive, prefix, str(path)).load()
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"could not read {path} (truncated or corrupt?): {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def to_mlx(array: np.ndarray):
    """numpy (or BF16Array) to an mx.array of the same dtype."""
    import mlx.core as mx

    if isinstance(array, BF16Array):
        return mx.array(np.asarray(array).view(np.uint16)).view(mx.bfloat16)
    return mx.array(np.asarray(array))
