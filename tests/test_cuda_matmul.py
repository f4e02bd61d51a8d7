"""cuda_matmul: the few-row projection kernel is CUDA-only; everywhere else its Linear is nn.Linear.

The kernel's own accuracy and speed are measured on the GPU by benchmarks/small_matmul.py (rel_err
per shape); here: where it may run, that the layers built on it compute and load as nn.Linear does,
and that swapping layers both ways keeps parameters and outputs.
"""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map

from conftest import stand_in_kernel, tiny_config, tiny_model
from mlx_redrafter import cuda_matmul
from mlx_redrafter.llama import apply_rope, fuse_projections
from mlx_redrafter.cuda_matmul import (Fused, Linear, available, fused_linear, reference, rotate, rows_matmul,
                                      swap_linears)


ON_CUDA = cuda_matmul.on_cuda()
same = mx.allclose if ON_CUDA else mx.array_equal  # the kernel sums in another order than cuBLAS


@pytest.mark.skipif(ON_CUDA, reason="off CUDA only")
def test_the_kernel_is_never_chosen_off_cuda():
    w = mx.zeros((64, 32), dtype=mx.float16)
    assert not any(available(rows, w) for rows in (1, 2, 38, 64, 65))


def test_the_kernel_is_chosen_only_for_few_rows_of_small_weights():
    w = mx.zeros((64, 32), dtype=mx.float16)
    assert not available(1, w) and not available(65, w)
    assert not available(8, mx.zeros((64, 30), dtype=mx.float16))       # K not a multiple of 8
    assert not available(8, mx.zeros((2**14, 2**10), dtype=mx.float16))  # 32 MiB: cuBLAS reads it once
    assert available(38, w) == ON_CUDA
    assert not any(available(38, w.astype(t)) for t in (mx.bfloat16, mx.float32))  # only fp16 was measured


def test_rows_matmul_falls_back_to_mlx_matmul_where_it_must():
    x, w = mx.random.normal((38, 40)), mx.random.normal((24, 40))
    assert same(rows_matmul(x, w), x @ w.T)
    assert rows_matmul(x, w.astype(mx.float16)).dtype == mx.float32   # MLX's promotion, as nn.Linear
    with pytest.raises(ValueError):
        rows_matmul(mx.zeros((4, 48)), w)                                   # MLX's own shape error


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA backend only")
@pytest.mark.parametrize("rows, n, k", [(2, 7, 8), (3, 33, 264), (38, 960, 576), (41, 577, 1536), (64, 96, 256)])
def test_the_kernel_matches_an_fp32_product(rows, n, k):
    x, w = mx.random.normal((rows, k)).astype(mx.float16), (mx.random.normal((n, k)) * k**-0.5).astype(mx.float16)
    want = x.astype(mx.float32) @ w.astype(mx.float32).T
    got = rows_matmul(x, w)
    assert got.dtype == mx.float16 and got.shape == (rows, n)
    assert (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item() < 2e-3


# (norm, bias, glu, silu, residual) as the model uses them, and a few more
FUSIONS = [(True, False, False, False, False), (True, False, True, False, False), (False, False, False, False, True),
           (False, True, False, True, True), (True, True, True, False, True), (False, True, False, False, False)]


def _fusion_case(rows, n, k, norm, bias, glu, silu, residual, dtype=mx.float32):
    out_n = n // 2 if glu else n
    layer = Linear(k, n, bias=bias)
    layer.weight = layer.weight * 3  # outputs of a few units: silu's curve matters
    if bias:
        layer.bias = mx.random.normal((n,))  # as large as the products: a misplaced bias shows
    rms = nn.RMSNorm(k, eps=1e-5) if norm else None
    if rms is not None:
        rms.weight = 1 + mx.random.normal((k,)) * 0.2
    x = mx.random.normal((rows, k)) * 2
    res = mx.random.normal((rows, out_n)) if residual else None
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    layer.update({name: cast(a) for name, a in layer.parameters().items()})
    if rms is not None:
        rms.weight = cast(rms.weight)
    return layer, rms, cast(x), cast(res)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fused_linear_without_the_kernel_is_the_unfused_ops(fusion):
    """Off CUDA (and on it, for the fp32 layers the kernel leaves alone) the same ops as the layers had."""
    norm, bias, glu, silu, residual = fusion
    layer, rms, x, res = _fusion_case(5, 24, 16, *fusion)
    y = layer(rms(x) if norm else x)
    if glu:
        y = nn.silu(y[:, :12]) * y[:, 12:]
    elif silu:
        y = nn.silu(y)
    want = res + y if residual else y
    assert mx.array_equal(fused_linear(layer, x, rms, res, glu, silu), want)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_fused_launch_gets_its_inputs_in_order(fusion, monkeypatch):
    """Where the kernel runs (a stand-in computing `reference` here), one launch with the flags and inputs it names."""
    norm, bias, glu, silu, residual = fusion
    layer, rms, x, res = _fusion_case(5, 24, 16, *fusion)
    want = fused_linear(layer, x, rms, res, glu, silu)
    calls = stand_in_kernel(monkeypatch)
    got = fused_linear(layer, x[None], rms, None if res is None else res[None], glu, silu)
    assert calls == [(5, Fused(norm, 1e-5 if norm else 0.0, bias, glu, silu and not glu, residual))]
    assert got.shape == (1, *want.shape) and mx.allclose(got[0], want, atol=1e-5)


def test_a_layer_of_the_model_is_four_launches(monkeypatch):
    """norm + q/k/v, o + residual, norm + gate/up + silu * up, down + residual; the same outputs."""
    model = tiny_model(tiny_config("smollm", layers=2))
    fuse_projections(model)  # as loading does
    for layer in model.layers:  # norms of their own: a swapped or missing one changes the outputs
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = 1 + mx.random.normal(norm.weight.shape) * 0.3
    tokens = mx.random.randint(0, 64, (1, 9))
    want = model(tokens)
    calls = stand_in_kernel(monkeypatch)
    got = model(tokens)
    per_layer = [(f.norm, f.glu, f.residual) for _, f in calls]
    assert per_layer == [(True, False, False), (False, False, True), (True, True, False), (False, False, True)] * 2
    assert mx.allclose(got, want, atol=1e-4)


def test_rotate_is_mlx_rope():
    """The kernel's RoPE formula (`rotate`, pairs (i, i + D / 2)) against mx.fast.rope at per-token positions."""
    x, positions = mx.random.normal((2, 3, 7, 64)), mx.random.randint(0, 4000, (2, 7))
    rope = nn.RoPE(64, base=100000.0, scale=0.5)
    want = apply_rope(rope, x.transpose(0, 2, 1, 3), positions)
    got = rotate(x, positions, cuda_matmul._inv_freq(100000.0, 0.5, 64))
    assert mx.allclose(got, want, atol=2e-3)


def test_a_tree_forward_is_four_launches_with_rope_in_the_first(monkeypatch):
    """With per-token positions (a verify), the q/k/v launch also rotates q and k and lays out the heads."""
    model = tiny_model(tiny_config("smollm", layers=2))
    fuse_projections(model)
    tokens, positions = mx.random.randint(0, 64, (2, 5)), mx.array([[3, 4, 4, 5, 6], [9, 10, 11, 11, 12]])
    want = model(tokens, positions=positions, mask=mx.tril(mx.ones((5, 5), mx.bool_)))
    calls = stand_in_kernel(monkeypatch)
    got = model(tokens, positions=positions, mask=mx.tril(mx.ones((5, 5), mx.bool_)))
    flags = [(f.norm, f.rope, f.glu, f.residual) for _, f in calls]
    assert flags == [(True, True, False, False), (False, False, False, True), (True, False, True, False),
                     (False, False, False, True)] * 2
    assert mx.allclose(got, want, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA backend only")
@pytest.mark.parametrize("B, n, heads, kv_heads, dim, bias, norm, scale", [
    (1, 38, 9, 3, 64, False, True, 1.0), (1, 45, 9, 3, 64, False, True, 1.0), (2, 5, 4, 2, 32, True, True, 1.0),
    (1, 2, 2, 1, 128, False, False, 0.5), (1, 7, 4, 4, 16, True, False, 0.25)])
def test_the_qkv_rope_kernel_matches_an_fp32_reference(B, n, heads, kv_heads, dim, bias, norm, scale):
    k = 576
    layer = Linear(k, (heads + 2 * kv_heads) * dim, bias=bias)
    if bias:
        layer.bias = mx.random.normal(layer.bias.shape)
    layer.update({name: a.astype(mx.float16) for name, a in layer.parameters().items()})
    rms = nn.RMSNorm(k) if norm else None
    if norm:
        rms.weight = (1 + mx.random.normal((k,)) * 0.2).astype(mx.float16)
    rope = nn.RoPE(dim, base=100000.0, scale=scale)
    x, positions = mx.random.normal((B, n, k)).astype(mx.float16), mx.random.randint(0, 3000, (B, n))
    got = cuda_matmul.qkv_rope(layer, x, rms, rope, positions, heads, kv_heads)
    assert got is not None  # the kernel took it
    up = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    want = cuda_matmul.reference_qkv_rope(up(x), up(layer.weight), up(rms.weight) if norm else None, 1e-5,
                                          up(layer.get("bias")), positions, cuda_matmul._inv_freq(100000.0, scale, dim),
                                          heads, kv_heads)
    for g, w in zip(got, want):
        assert g.dtype == mx.float16 and g.shape == w.shape
        assert (mx.abs(g.astype(mx.float32) - w).max() / mx.abs(w).max()).item() < 4e-3


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA backend only")
def test_a_tree_forward_on_the_kernel_matches_mlx_ops(monkeypatch):
    """fp16 on the GPU: the fused launches against the same forward with the fusion off."""
    model = tiny_model(tiny_config("smollm", layers=2, hidden_size=64))
    fuse_projections(model)
    model.update(tree_map(lambda a: a.astype(mx.float16), model.parameters()))
    tokens, positions = mx.random.randint(0, 64, (2, 6)), mx.array([[3, 4, 4, 5, 6, 7], [9, 10, 11, 11, 12, 13]])
    mask = mx.tril(mx.ones((6, 6), mx.bool_))
    launched, real = [], cuda_matmul._get_kernel
    monkeypatch.setattr(cuda_matmul, "_get_kernel", lambda fused: launched.append(fused) or real(fused))
    got = model(tokens, positions=positions, mask=mask)
    assert sum(f.rope for f in launched) == 2  # each layer's q/k/v went through the RoPE launch
    monkeypatch.setattr(cuda_matmul, "FUSE", False)
    want = model(tokens, positions=positions, mask=mask)
    assert (mx.abs(got - want).max() / mx.abs(want).max()).item() < 1e-2


def test_float_positions_are_left_to_mlx(monkeypatch):
    layer, x = Linear(16, 48), mx.random.normal((1, 5, 16)).astype(mx.float16)
    layer.weight = layer.weight.astype(mx.float16)
    layer.bias = layer.bias.astype(mx.float16)
    calls = stand_in_kernel(monkeypatch)
    assert cuda_matmul.qkv_rope(layer, x, None, nn.RoPE(8), mx.arange(5.0)[None], 2, 2) is None and calls == []
    assert cuda_matmul.qkv_rope(layer, x, None, nn.RoPE(8), mx.arange(5)[None], 2, 2) is not None  # integers: taken
    assert [f.rope for _, f in calls] == [True]


def test_a_bias_of_another_dtype_is_left_to_mlx(monkeypatch):
    layer = Linear(16, 8)
    layer.weight = layer.weight.astype(mx.float16)  # the bias stays fp32: MLX promotes the output
    calls = stand_in_kernel(monkeypatch)
    assert layer(mx.ones((5, 16), mx.float16)).dtype == mx.float32 and calls == []


def test_unfused_adds_the_bias_outside_the_kernel(monkeypatch):
    layer, x = Linear(16, 8), mx.random.normal((5, 16))
    calls = stand_in_kernel(monkeypatch)
    monkeypatch.setattr(cuda_matmul, "FUSE", False)
    assert mx.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-5) and calls == [(5, Fused())]


def test_the_unfused_switch_keeps_the_kernel_but_not_the_fusion():
    code = ("from mlx_redrafter import cuda_matmul as c; print(c.ENABLED, c.FUSE)")
    for switch, want in (("unfused", "True False"), ("on", "True True"), ("off", "False False"), ("Yes", "True True"),
                         ("fast", "True True")):
        env = os.environ | {"MLX_REDRAFTER_ROWS_MATMUL": switch}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.split() == want.split()
        bad = switch == "fast"
        assert ("is not on, off or unfused" in done.stderr) == bad and len(done.stderr.splitlines()) == bad


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA backend only")
@pytest.mark.parametrize("rows, n, k", [(2, 8, 8), (3, 66, 264), (38, 3072, 576), (41, 577, 1536)])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_fused_kernel_matches_an_fp32_reference(rows, n, k, fusion):
    norm, bias, glu, silu, residual = fusion
    if glu and n % 2:
        n += 1
    layer, rms, x, res = _fusion_case(rows, n, k, *fusion, dtype=mx.float16)
    up = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    want = reference(up(x), up(layer.weight), up(rms.weight) if norm else None, 1e-5, up(layer.get("bias")),
                     up(res), glu, silu)
    got = fused_linear(layer, x, rms, res, glu, silu)
    assert got.dtype == mx.float16 and got.shape == want.shape
    assert (mx.abs(got.astype(mx.float32) - want).max() / mx.abs(want).max()).item() < 4e-3


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_an_nn_linear(bias):
    ours, plain = Linear(40, 24, bias=bias), nn.Linear(40, 24, bias=bias)
    plain.update(ours.parameters())
    x = mx.random.normal((2, 19, 40))
    assert isinstance(ours, nn.Linear)
    assert sorted(k for k, _ in tree_flatten(ours.parameters())) == sorted(k for k, _ in tree_flatten(plain.parameters()))
    assert same(ours(x), plain(x))


def test_swap_linears_both_ways_keeps_parameters_and_outputs():
    model = tiny_model(tiny_config("smollm"))
    tokens = mx.random.randint(0, 64, (1, 9))
    before, params = model.logits(model(tokens)), dict(tree_flatten(model.parameters()))
    kinds = lambda m: {type(x) for _, x in m.named_modules() if isinstance(x, nn.Linear)}  # noqa: E731
    assert kinds(model) == {Linear}
    swap_linears(model, nn.Linear)
    assert kinds(model) == {nn.Linear}
    assert same(model.logits(model(tokens)), before)
    swap_linears(model, Linear)
    assert kinds(model) == {Linear}
    after = dict(tree_flatten(model.parameters()))
    assert sorted(after) == sorted(params) and all(after[k] is params[k] for k in params)  # the same arrays


def test_swap_linears_reaches_layers_inside_lists():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False)]

    head = swap_linears(Head(), Linear)
    assert [type(m) for m in head.layers] == [Linear, nn.ReLU, Linear]


@pytest.mark.parametrize("switch, tile, want", [("off", "4x1", "False 4 1"), ("on", "16x4", "True 16 4"),
                                                 ("1", "nonsense", "True 4 2"), ("no", "65x2", "False 4 2")])
def test_the_environment_switch_and_tile(switch, tile, want):
    code = "from mlx_redrafter import cuda_matmul as c; print(c.ENABLED, c.ROWS_PER_WARP, c.COLS_PER_WARP)"
    env = os.environ | {"MLX_REDRAFTER_ROWS_MATMUL": switch, "MLX_REDRAFTER_ROWS_TILE": tile}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == want.split()
    bad = tile in ("nonsense", "65x2")
    assert ("is not RxC" in done.stderr) == bad and len(done.stderr.splitlines()) == bad  # one line


def test_a_build_without_mx_cuda_has_no_cuda(monkeypatch):
    """Metal and CPU builds of other MLX versions may lack mx.cuda: never an AttributeError per call."""
    monkeypatch.delattr(mx, "cuda", raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert not cuda_matmul.on_cuda()
    layer, x = Linear(16, 8), mx.random.normal((5, 16))
    assert mx.allclose(layer(x), x @ layer.weight.T + layer.bias)
