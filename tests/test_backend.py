"""The fast-BLAS preload on Linux and the dtype defaults."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_redrafter import backend


def probe(env_extra, code="import mlx_redrafter.backend as b; import mlx_redrafter; print(b.blas_library)"):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != "linux" or backend.find_blas() is None, reason="needs Linux with OpenBLAS installed")
def test_blas_is_preloaded_and_can_be_turned_off():
    on = probe({"MLX_REDRAFTER_BLAS": "auto"})
    assert on.stdout.strip() == os.path.realpath(backend.find_blas())
    off = probe({"MLX_REDRAFTER_BLAS": "off"})
    assert off.stdout.strip() == "None"


LINUX_CPU = sys.platform == "linux" and platform.machine() == "x86_64" and not backend.on_gpu()
WHY_NOT = (f"the registry's OpenBLAS is for MLX's Linux x86_64 CPU wheel; this is {sys.platform} "
           f"{platform.machine()}{' on a GPU' if sys.platform == 'linux' and backend.on_gpu() else ''}")

WHERE_BLAS = """
import json, site, sysconfig
import mlx_redrafter
import mlx.core as mx
from mlx_redrafter import backend
mx.eval(mx.ones((64, 576)) @ mx.ones((576, 1536)))
maps = [line.split()[-1] for line in open("/proc/self/maps") if "/" in line]
print(json.dumps({
    "in_use": backend.blas_in_use(),
    "site": sorted(set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"],
                                                 sysconfig.get_paths()["platlib"]])),
    "gfortran": sorted({m for m in maps if "libgfortran" in m}),
    "notice": backend.blas_notice(),
}))
"""


@pytest.mark.skipif(not LINUX_CPU, reason=WHY_NOT)
def test_fast_blas_is_loaded_from_the_wheel():
    """After `pip install ".[cpu]"` MLX's matmuls run on the wheel's OpenBLAS (no system package).

    Fails when the cpu extra lost ngsolve-openblas, when the preload picks a system
    library over it, or when it cannot be loaded without a system libgfortran.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLX_REDRAFTER_BLAS"}
    r = subprocess.run([sys.executable, "-c", WHERE_BLAS], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["in_use"] is not None, f"MLX uses its reference BLAS: {got['notice']}"
    inside = [s for s in got["site"] if Path(got["in_use"]).is_relative_to(Path(s).resolve())]
    assert inside, f"BLAS {got['in_use']} is not inside site-packages {got['site']}: pip install -e '.[cpu]'"
    assert "ngsolve_openblas" in got["in_use"]
    # its libgfortran is MLX's own copy, not a system one
    outside = [g for g in got["gfortran"] if not any(Path(g).is_relative_to(Path(s).resolve()) for s in got["site"])]
    assert not outside, f"a system libgfortran was loaded: {outside}"
    assert got["notice"] is None


@pytest.mark.skipif(sys.platform != "linux" or backend.on_gpu(), reason="the slow-BLAS notice is for Linux CPUs")
def test_slow_blas_notice_says_what_to_do():
    code = "import mlx_redrafter.backend as b; import mlx_redrafter; print(b.blas_notice())"
    off = probe({"MLX_REDRAFTER_BLAS": "off"}, code).stdout.strip()
    assert off.startswith("note: slow matmuls") and "MLX_REDRAFTER_BLAS=off" in off and "\n" not in off
    first = probe({"MLX_REDRAFTER_BLAS": "auto"}, "import mlx.core; " + code).stdout.strip()
    auto = probe({"MLX_REDRAFTER_BLAS": "auto"}, code).stdout.strip()
    if backend.find_blas() is not None:
        assert "import mlx_redrafter first" in first
        assert auto == "None"
    else:  # nothing to load: say what to install
        assert "pip install" in auto and "pip install" in first


@pytest.mark.skipif(sys.platform != "linux" or backend.on_gpu(), reason="the slow-BLAS notice is for Linux CPUs")
def test_generate_prints_the_slow_blas_notice(tmp_path):
    from conftest import tiny_config, tiny_model
    from test_loading import write_model_dir

    config = tiny_config(vocab_size=64)
    path = write_model_dir(tmp_path / "m", tiny_model(config), config)
    args = [sys.executable, "-m", "mlx_redrafter", "generate", "-p", "t3 t4", "--model", str(path),
            "--no-chat-template", "-n", "3", "--autoregressive"]
    env = {**os.environ, "MLX_REDRAFTER_BLAS": "off"}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("note: slow matmuls")]


def test_importing_mlx_first_warns():
    r = probe({"MLX_REDRAFTER_BLAS": "auto"}, "import mlx.core; import mlx_redrafter")
    if backend.find_blas() is not None and sys.platform == "linux":
        assert "import mlx_redrafter first" in r.stderr


def test_default_dtype_on_cpu_is_float32():
    import mlx.core as mx

    if not backend.on_gpu():
        assert backend.default_dtype() == mx.float32
    assert backend.parse_dtype("bf16") == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        backend.parse_dtype("int3")


def test_default_beam_shape_per_device(monkeypatch):
    from mlx_redrafter import beam_search
    from mlx_redrafter.beam_search import DEFAULT_SHAPE, BeamShape, default_shape

    monkeypatch.setattr(beam_search.backend, "on_gpu", lambda: False)
    cpu_mp, gpu_mp = DEFAULT_SHAPE['cpu'][4], DEFAULT_SHAPE['gpu'][4]
    assert default_shape() == BeamShape(4, 4, True, DEFAULT_SHAPE['cpu'][2], min_prob=cpu_mp)
    assert default_shape(8, None, False, 5, 'beams') == BeamShape(8, 4, False, 5, 'beams', min_prob=cpu_mp)
    assert default_shape(min_prob=0).min_prob == 0
    monkeypatch.setattr(beam_search.backend, "on_gpu", lambda: True)
    assert default_shape() == BeamShape(*DEFAULT_SHAPE['gpu'][:2], True, DEFAULT_SHAPE['gpu'][2], min_prob=gpu_mp)
    assert default_shape(None, 5) == BeamShape(DEFAULT_SHAPE['gpu'][0], 5, True, DEFAULT_SHAPE['gpu'][2], min_prob=gpu_mp)
