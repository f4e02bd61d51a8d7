"""Backend facts: a fast BLAS for MLX's Linux CPU wheel, and the dtype per device.

MLX's Linux CPU wheel links the reference BLAS (~5 GFLOP/s on a 64x576 @
576x1536 matmul). Loading OpenBLAS with RTLD_GLOBAL *before* mlx is imported
makes libmlx bind its cblas/LAPACK symbols there (~90 GFLOP/s on one EPYC core).

Where it comes from, in order:

1. ``MLX_REDRAFTER_BLAS``: ``off`` keeps the reference BLAS; a path names a
   library (an OpenBLAS, MKL's ``libmkl_rt``, ...).
2. The ``ngsolve-openblas`` wheel (OpenBLAS 0.3.33, DYNAMIC_ARCH, BSD-3-Clause),
   a dependency of the ``cpu`` extra on Linux x86_64. It needs
   ``libgfortran.so.5``, which a bare machine lacks; MLX's CPU wheel carries one
   under a hashed name (``mlx_cpu.libs/libgfortran-*.so.5*``), and the wheel's
   OpenBLAS looks for it beside itself (RPATH ``$ORIGIN``), so we load it
   through two symbolic links in a temporary folder: no system package needed.
3. A system OpenBLAS (``apt-get install libopenblas0-pthread``, ``dnf install
   openblas``): the fallback where the wheel is not installed (Linux aarch64 has
   no ngsolve-openblas wheel). On the 2-core EPYC, Debian's OpenBLAS and the
   wheel's on one thread decode at about the same speed (measurements in the
   README's Linux notes).

``blas_notice()`` says in one line when matmuls run on the reference BLAS
(Linux CPU only) and what to do; ``generate`` prints it.
"""

import ctypes
import glob
import importlib.util
import os
import platform
import shutil
import sys
import tempfile

_SYSTEM_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]
WHEEL_PACKAGE = "ngsolve_openblas"  # pip name ngsolve-openblas

blas_library = None  # the library preloaded (its real path), if any
blas_problem = None  # why none was preloaded on Linux, for blas_notice()
_handles = []  # keep the loaded libraries referenced


def _off(setting):
    return setting.lower() in ("off", "0", "no", "false")


def _package_dirs(name):
    """The folders of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return list(spec.submodule_search_locations or [])


def wheel_blas():
    """The OpenBLAS shipped by the ngsolve-openblas wheel, if installed."""
    for folder in _package_dirs(WHEEL_PACKAGE):
        found = sorted(glob.glob(os.path.join(folder, "libopenblas*.so*")))
        if found:
            return os.path.realpath(found[0])
    return None


def mlx_gfortran():
    """MLX's own libgfortran (hashed name, in site-packages/mlx_cpu.libs), if any."""
    for folder in _package_dirs("mlx"):
        found = sorted(glob.glob(os.path.join(os.path.dirname(folder), "mlx_cpu.libs", "libgfortran*.so.5*")))
        if found:
            return os.path.realpath(found[0])
    return None


def system_blas():
    for pattern in _SYSTEM_CANDIDATES:
        found = [f for f in glob.glob(pattern) if os.path.exists(f)]  # not a dangling link
        if found:
            return found[0]
    return None


def find_blas():
    """The library preload_blas() would load, or None."""
    setting = os.environ.get("MLX_REDRAFTER_BLAS", "auto")
    if _off(setting):
        return None
    if setting not in ("auto", ""):
        return setting
    return wheel_blas() or system_blas()


def _load_beside_gfortran(path, gfortran):
    """Load `path` so that its NEEDED libgfortran.so.5 is `gfortran`.

    The library's RPATH is $ORIGIN, and $ORIGIN is the folder of the name it was
    opened by: open it through a link in a temporary folder that also holds a
    link libgfortran.so.5 -> gfortran. `gfortran` is opened first by its real
    path (so its own $ORIGIN finds its libquadmath); the loader then sees the
    link's target is that same file and reuses it.
    """
    _handles.append(ctypes.CDLL(gfortran))
    folder = tempfile.mkdtemp(prefix="mlx-redrafter-blas-")
    try:
        os.symlink(gfortran, os.path.join(folder, "libgfortran.so.5"))
        link = os.path.join(folder, os.path.basename(path))
        os.symlink(path, link)
        _handles.append(ctypes.CDLL(link, mode=ctypes.RTLD_GLOBAL))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load(path):
    gfortran = mlx_gfortran()
    if gfortran is not None and path == wheel_blas():
        try:
            return _load_beside_gfortran(path, gfortran)
        except OSError:
            pass  # try the plain way below
    try:
        _handles.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    except OSError as e:
        if gfortran is None or "libgfortran.so.5" not in str(e):
            raise
        _load_beside_gfortran(path, gfortran)


def preload_blas():
    """On Linux, load an optimized BLAS globally before mlx; a no-op elsewhere."""
    global blas_library, blas_problem
    if platform.system() != "Linux" or blas_library is not None:
        return blas_library
    path = find_blas()
    if path is None:
        blas_problem = "off" if _off(os.environ.get("MLX_REDRAFTER_BLAS", "auto")) else "none"
        return None
    if "mlx.core" in sys.modules:
        blas_problem = "mlx-first"
        print(
            "mlx-redrafter: mlx was imported before mlx_redrafter, so the fast BLAS could not be "
            "preloaded; import mlx_redrafter first",
            file=sys.stderr,
        )
        return None
    try:
        _load(path)
    except OSError as e:
        blas_problem = f"could not load {path}: {e}"
        print(f"mlx-redrafter: could not load BLAS {path}: {e}", file=sys.stderr)
        return None
    blas_library = os.path.realpath(path)
    blas_problem = None
    return blas_library


def blas_in_use():
    """Real path of the library that provides cblas_sgemm to MLX, or None for MLX's reference BLAS.

    MLX's libmlx resolves cblas_sgemm in the global scope first, so the
    global definition, if any, is the one it calls. Linux only (None elsewhere).
    """
    if platform.system() != "Linux":
        return None
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi and len(fields) == 6:
                    path = fields[5].strip()
                    return None if "mlx_cpu.libs" in path else path
    except OSError:
        pass
    return blas_library


def blas_notice():
    """One line when matmuls run on MLX's slow reference BLAS (Linux CPU), saying what to do; else None."""
    if platform.system() != "Linux" or on_gpu() or blas_in_use() is not None:
        return None
    head = "note: slow matmuls: this session runs on MLX's slow reference BLAS (~20x slower on the CPU)"
    if blas_problem == "off":
        return f"{head} because MLX_REDRAFTER_BLAS=off; unset it to load OpenBLAS"
    if blas_problem == "mlx-first":
        return (f"{head} because mlx was imported before mlx_redrafter; import mlx_redrafter first, "
                "before mlx and mlx_lm (in a notebook, restart the kernel)")
    if blas_problem not in (None, "none"):
        return f"{head}: {blas_problem}; set MLX_REDRAFTER_BLAS=/path/to/libopenblas.so.0"
    if platform.machine() in ("x86_64", "AMD64"):
        fix = 'pip install "mlx-redrafter[cpu]" (it brings ngsolve-openblas) or apt-get install libopenblas0-pthread'
    else:
        fix = "apt-get install libopenblas0-pthread (or dnf install openblas)"
    return f"{head}; for a fast one: {fix}"


def print_blas_notice(file=None):
    note = blas_notice()
    if note:
        print(note, file=file or sys.stderr)


def machine() -> str:
    """This machine in one line, for benchmark results and for the key of `tune`'s stored choice."""
    if on_gpu():
        import mlx.core as mx

        try:
            name = mx.device_info().get("device_name", "GPU")
        except Exception:
            name = "GPU"
        return f"{name} ({platform.system()})"
    return (f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} ({platform.system()}, "
            f"BLAS: {blas_in_use() or blas_library or 'reference'})")


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
