"""The fast-BLAS preload on Linux and the dtype defaults."""

import os
import subprocess
import sys

import pytest

from mlx_redrafter import backend


def probe(env_extra, code="import mlx_redrafter.backend as b; import mlx_redrafter; print(b.blas_library)"):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != "linux" or backend.find_blas() is None, reason="needs Linux with OpenBLAS installed")
def test_blas_is_preloaded_and_can_be_turned_off():
    on = probe({"MLX_REDRAFTER_BLAS": "auto"})
    assert on.stdout.strip() == backend.find_blas()
    off = probe({"MLX_REDRAFTER_BLAS": "off"})
    assert off.stdout.strip() == "None"


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
    assert default_shape() == BeamShape(4, 4, True, DEFAULT_SHAPE['cpu'][2])
    assert default_shape(8, None, False, 5, 'beams') == BeamShape(8, 4, False, 5, 'beams')
    monkeypatch.setattr(beam_search.backend, "on_gpu", lambda: True)
    assert default_shape() == BeamShape(*DEFAULT_SHAPE['gpu'][:2], True, DEFAULT_SHAPE['gpu'][2])
    assert default_shape(None, 5) == BeamShape(DEFAULT_SHAPE['gpu'][0], 5, True, DEFAULT_SHAPE['gpu'][2])
