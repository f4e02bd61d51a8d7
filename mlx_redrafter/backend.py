"""Backend facts: a fast BLAS for MLX's Linux CPU wheel, and the dtype per device.

MLX's Linux CPU wheel links the reference BLAS (~6 GFLOP/s on a 576x1536
matmul). Loading OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes
libmlx bind its cblas symbols there (~100-175 GFLOP/s). Set
MLX_REDRAFTER_BLAS=off to keep the reference BLAS, or MLX_REDRAFTER_BLAS=PATH
to name a library. Install one with `apt-get install libopenblas0-pthread`
(Debian/Ubuntu) or `dnf install openblas` (Fedora).
"""

import ctypes
import glob
import os
import platform
import sys

_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]

blas_library = None  # the library preloaded, if any
blas_too_late = None  # the fast BLAS found but not loaded because mlx was imported first


def find_blas():
    setting = os.environ.get("MLX_REDRAFTER_BLAS", "auto")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting not in ("auto", ""):
        return setting
    for pattern in _CANDIDATES:
        found = glob.glob(pattern)
        if found:
            return found[0]
    return None


def preload_blas():
    """On Linux, load an optimized BLAS globally before mlx; a no-op elsewhere."""
    global blas_library
    if platform.system() != "Linux" or blas_library is not None:
        return blas_library
    path = find_blas()
    if path is None:
        return None
    if "mlx.core" in sys.modules:
        global blas_too_late
        blas_too_late = path
        print(
            "mlx-redrafter: mlx was imported before mlx_redrafter, so the fast BLAS could not be "
            "preloaded; import mlx_redrafter first",
            file=sys.stderr,
        )
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        print(f"mlx-redrafter: could not load BLAS {path}: {e}", file=sys.stderr)
        return None
    blas_library = path
    return path


def blas_notice():
    """One line saying this session runs on MLX's slow reference BLAS and how to fix it, or None.

    Said when a fast BLAS was found but mlx (or mlx_lm) had been imported before
    mlx_redrafter, so it could not be preloaded; only on the CPU, where it matters.
    """
    if blas_too_late is None or on_gpu():
        return None
    return ("mlx-redrafter: this session runs on MLX's slow reference BLAS (mlx was imported before "
            "mlx_redrafter): import mlx_redrafter first, before mlx and mlx_lm (in a notebook, restart the kernel)")


def print_blas_notice(file=None):
    note = blas_notice()
    if note:
        print(note, file=file or sys.stderr)


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def default_dtype():
    """fp32 on the CPU (fastest there, measured); fp16 on GPUs.

    Not bf16: on the lent H200, SmolLM2-135M-Instruct in bf16 answers "What is
    the capital of France?" with French gibberish (mlx-lm's model too), while
    fp16 and fp32 answer "The capital of France is Paris."
    """
    import mlx.core as mx

    return mx.float16 if on_gpu() else mx.float32


def parse_dtype(name):
    import mlx.core as mx

    if name is None or name == "auto":
        return default_dtype()
    names = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16,
             "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16, auto")
    return names[name]
