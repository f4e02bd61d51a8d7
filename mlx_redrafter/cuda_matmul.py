"""A matmul for a few dozen rows on MLX's CUDA backend: ``x (M, K) @ w (N, K).T -> (M, N)``.

Why: MLX CUDA sends any matmul of more than one row to cuBLASLt. For a 135M model's
projections on two H200 hosts that cost 16-23 us for 32-48 rows against 6-7 us for MLX's one-row
kernel (`benchmarks/small_matmul.py`), and a verify forward is 120 of them: the tree cost
about twice a plain token for launch and tiling overhead, not arithmetic. Here each warp
computes two output columns for four rows (8 halves per lane per load, fp32 accumulation),
12-16 us at those row counts; end to end the GPU step went from 2.6 to 1.8 plain tokens.

A small model's forward is hundreds of such launches, so the kernel also takes in what surrounds
a projection (`fused_linear`): the RMSNorm before it (the rows are read whole anyway, so their
sum of squares is free), a bias, silu or silu(gate) * up after it, and the residual add. A layer
is then four launches around its attention instead of nine.

Only used where ``available()`` (a CUDA GPU, fp16 weights of at most 16 MiB (the dtype measured
on the GPU; bf16 and fp32 keep cuBLAS), K a multiple of 8, 2 <= M <= MAX_ROWS, and ``MLX_REDRAFTER_ROWS_MATMUL`` not ``off``; ``unfused`` keeps the
kernel but not the fusion); everything else, Metal and the CPU included, keeps MLX's ops.

>>> x = mx.random.normal((38, 576)).astype(mx.float16); w = mx.random.normal((960, 576)).astype(mx.float16)
>>> rows_matmul(x, w).shape    # == (x @ w.T).shape on every backend
(38, 960)
"""

import hashlib
import os
import re
import sys
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

MAX_ROWS = 64  # at 64 rows cuBLAS measured 15.5 us against the kernel's 17.5; 49-63 rows unmeasured
# Warps of different rows read the same weights again, from L2 while they fit there: larger
# matrices (a 7B model's) stay with cuBLAS, which reads them once.
MAX_WEIGHT_BYTES = 16 * 2**20


def _switch(setting: str) -> str:
    """MLX_REDRAFTER_ROWS_MATMUL: on (default), off, or unfused (the kernel for the projections alone, norms
    and epilogues as MLX ops: to measure the fusion)."""
    value = setting.strip().lower()
    for name, spellings in (("on", ("on", "1", "yes", "true")), ("off", ("off", "0", "no", "false")),
                            ("unfused", ("unfused",))):
        if value in spellings:
            return name
    print(f"mlx-redrafter: MLX_REDRAFTER_ROWS_MATMUL={setting!r} is not on, off or unfused; using on", file=sys.stderr)
    return "on"


_SWITCH = _switch(os.environ.get("MLX_REDRAFTER_ROWS_MATMUL", "on"))
ENABLED = _SWITCH != "off"
FUSE = _SWITCH == "on"


def _tile(setting: str) -> tuple:
    """Each warp's tile, rows x columns: 4x2 (with 8x1 the fastest summed over 32, 38 and 48 rows on the
    H200, within 0.5%, `benchmarks/small_matmul.py`), or MLX_REDRAFTER_ROWS_TILE=RxC (R 1-64, C 1-8) to measure others."""
    found = re.fullmatch(r"(\d{1,2})x(\d)", setting.strip())
    if found and 1 <= int(found[1]) <= MAX_ROWS and 1 <= int(found[2]) <= 8:
        return int(found[1]), int(found[2])
    print(f"mlx-redrafter: MLX_REDRAFTER_ROWS_TILE={setting!r} is not RxC (rows 1-64 x columns 1-8); "
          "using 4x2", file=sys.stderr)
    return 4, 2


ROWS_PER_WARP, COLS_PER_WARP = _tile(os.environ.get("MLX_REDRAFTER_ROWS_TILE", "4x2"))
WARPS_PER_BLOCK = 4

_SOURCE = """
    // warp w: output columns [n0, n0 + COLS) of rows [m0, m0 + ROWS); neighbouring warps share rows (L1).
    // With RD_GLU the weights hold gate rows then up rows: a warp reads both halves of its columns.
    const int M = x_shape[0];  // rows at run time: one build serves every row count >= ROWS (fewer: own builds)
    constexpr int OUT_N = RD_GLU ? N / 2 : N;
    constexpr int WCOLS = RD_GLU ? 2 * COLS : COLS;
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
#if RD_ROPE
    // columns (head h, i) and (h, i + HD / 2), the pair RoPE rotates (COLS == 2); q heads, then k, then v
    constexpr int HALF = HD / 2;
    constexpr int col_groups = N / 2;
    const int n0 = ((warp % col_groups) / HALF) * HD + (warp % col_groups) % HALF;
#else
    constexpr int col_groups = (OUT_N + COLS - 1) / COLS;
    const int n0 = (warp % col_groups) * COLS;
#endif
    const int m0 = (warp / col_groups) * ROWS;
    if (m0 >= M) return;
    float acc[WCOLS][ROWS];
    float sq[ROWS];  // sum of x^2 per row, for RD_NORM
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        sq[r] = 0.0f;
        #pragma unroll
        for (int c = 0; c < WCOLS; ++c) acc[c][r] = 0.0f;
    }
    for (int k = lane * 8; k < K; k += 256) {
        float wv[WCOLS][8];
        #pragma unroll
        for (int c = 0; c < WCOLS; ++c) {
#if RD_ROPE
            const int n = n0 + c * HALF, col = n;
#else
            const int n = n0 + c % COLS, col = c < COLS ? n : n + OUT_N;
#endif
            if (n < OUT_N) {
                load8(w + (size_t)col * K + k, wv[c]);
            } else {
                #pragma unroll
                for (int j = 0; j < 8; ++j) wv[c][j] = 0.0f;
            }
        }
#if RD_NORM
        float g[8];
        load8(gamma + k, g);
        #pragma unroll
        for (int c = 0; c < WCOLS; ++c) {
            #pragma unroll
            for (int j = 0; j < 8; ++j) wv[c][j] *= g[j];
        }
#endif
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (m0 + r < M) {
                float xv[8];
                load8(x + (size_t)(m0 + r) * K + k, xv);
                #pragma unroll
                for (int j = 0; j < 8; ++j) {
                    sq[r] += RD_NORM ? xv[j] * xv[j] : 0.0f;
                    #pragma unroll
                    for (int c = 0; c < WCOLS; ++c) acc[c][r] += wv[c][j] * xv[j];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {  // xor butterflies: every lane gets the sums
            if (RD_NORM) sq[r] += __shfl_xor_sync(0xffffffff, sq[r], o);
            #pragma unroll
            for (int c = 0; c < WCOLS; ++c) acc[c][r] += __shfl_xor_sync(0xffffffff, acc[c][r], o);
        }
    }
#if RD_ROPE
    // row m is token t of batch row b; lane r writes row r's pair into q_out, k_out or v_out (B, heads, SEQ, HD)
    const int SEQ = positions_shape[1];
    const int head = n0 / HD, i = n0 % HD;
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int m = m0 + r;
        if (lane != (r & 31) || m >= M) continue;
        const float scale = RD_NORM ? rsqrtf(sq[r] / K + RD_EPS) : 1.0f;
        float a = acc[0][r] * scale, b = acc[1][r] * scale;
#if RD_BIAS
        a += static_cast<float>(bias[n0]);
        b += static_cast<float>(bias[n0 + HALF]);
#endif
        const int batch = m / SEQ, t = m % SEQ;
        if (head < NQ + NKV) {
            float sn, cs;
            sincosf(static_cast<float>(positions[m]) * inv_freq[i], &sn, &cs);
            const float ra = a * cs - b * sn, rb = a * sn + b * cs;
            a = ra;
            b = rb;
        }
        T* dst = head < NQ ? q_out + ((size_t)(batch * NQ + head) * SEQ + t) * HD
               : head < NQ + NKV ? k_out + ((size_t)(batch * NKV + head - NQ) * SEQ + t) * HD
               : v_out + ((size_t)(batch * NKV + head - NQ - NKV) * SEQ + t) * HD;
        dst[i] = static_cast<T>(a);
        dst[i + HALF] = static_cast<T>(b);
    }
#else
    #pragma unroll
    for (int c = 0; c < COLS; ++c) {
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int n = n0 + c, m = m0 + r;
            if (lane != ((c * ROWS + r) & 31) || n >= OUT_N || m >= M) continue;
            const float scale = RD_NORM ? rsqrtf(sq[r] / K + RD_EPS) : 1.0f;
            float v = acc[c][r] * scale;
#if RD_BIAS
            v += static_cast<float>(bias[n]);
#endif
#if RD_GLU
            float up = acc[c + COLS][r] * scale;
#if RD_BIAS
            up += static_cast<float>(bias[n + OUT_N]);
#endif
            v = v / (1.0f + __expf(-v)) * up;
#elif RD_SILU
            v = v / (1.0f + __expf(-v));
#endif
#if RD_RES
            v += static_cast<float>(res[(size_t)m * OUT_N + n]);
#endif
            out[(size_t)m * OUT_N + n] = static_cast<T>(v);
        }
    }
#endif
"""

_HEADER = """
#include <cuda_fp16.h>
__device__ inline void load8(const __half* p, float* f) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
    #pragma unroll
    for (int i = 0; i < 4; ++i) { float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
"""


class Fused(NamedTuple):
    """What one launch does around x @ w.T: rms_norm x first (with weight gamma, eps), add a bias, then
    silu, or silu(gate half) * up half (glu), then add a residual."""

    norm: bool = False
    eps: float = 0.0
    bias: bool = False
    glu: bool = False
    silu: bool = False
    residual: bool = False
    rope: bool = False  # outputs q, k, v (B, heads, n, D), q and k rotated (`qkv_rope`)

    def input_names(self) -> list:
        return (["x", "w"] + ["gamma"] * self.norm + ["bias"] * self.bias + ["positions", "inv_freq"] * self.rope
                + ["res"] * self.residual)

    def output_names(self) -> list:
        return ["q_out", "k_out", "v_out"] if self.rope else ["out"]


PLAIN = Fused()
_kernels = {}


def _get_kernel(fused: Fused):
    if fused not in _kernels:
        flags = {"NORM": fused.norm, "BIAS": fused.bias, "GLU": fused.glu, "SILU": fused.silu, "RES": fused.residual,
                 "ROPE": fused.rope}
        defines = "".join(f"#define RD_{k} {int(v)}\n" for k, v in flags.items())
        defines += f"#define RD_EPS static_cast<float>({float(fused.eps)!r})\n"
        # MLX keeps built kernels on disk (/tmp/mlx/<version>/ptx) by name and template values, not by
        # source: the name carries the source's hash, so an edited kernel or another eps is never a stale one
        digest = hashlib.sha256((defines + _HEADER + _SOURCE).encode()).hexdigest()[:16]
        _kernels[fused] = mx.fast.cuda_kernel(
            name=f"redrafter_rows_matmul_{digest}", input_names=fused.input_names(),
            output_names=fused.output_names(), source=_SOURCE, header=defines + _HEADER,
        )
    return _kernels[fused]


def on_cuda() -> bool:
    """True where MLX's default device is a CUDA GPU (builds without `mx.cuda` have none)."""
    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def available(rows: int, w: mx.array) -> bool:
    """Whether rows_matmul runs the kernel for `rows` rows against weight `w` (N, K)."""
    return (
        2 <= rows <= MAX_ROWS and w.ndim == 2 and w.shape[1] % 8 == 0 and w.nbytes <= MAX_WEIGHT_BYTES
        and w.dtype == mx.float16 and ENABLED and on_cuda()
    )


def fits(x_rows: int, x_cols: int, x_dtype, w: mx.array) -> bool:
    """Whether the kernel takes x (x_rows, x_cols) of x_dtype against w: `available`, and x matches w."""
    return available(x_rows, w) and x_dtype == w.dtype and x_cols == w.shape[1]


def rows_matmul(x: mx.array, w: mx.array, rows_per_warp: int = ROWS_PER_WARP, cols_per_warp: int = COLS_PER_WARP) -> mx.array:
    """x (M, K) @ w (N, K).T: the kernel where it `fits`, else MLX's matmul (which also gives MLX's
    error for shapes that don't fit, and its type promotion)."""
    if not fits(*x.shape, x.dtype, w):
        return x @ w.T
    return _launch(x, w, rows_per_warp=rows_per_warp, cols_per_warp=cols_per_warp)


def _launch(x: mx.array, w: mx.array, fused: Fused = PLAIN, extra: tuple = (),
            rows_per_warp: int = ROWS_PER_WARP, cols_per_warp: int = COLS_PER_WARP, heads: tuple = ()):
    """One kernel: x (M, K), w (N, K) and the `extra` inputs `fused` names (gamma (K,), bias (N,),
    residual (M, N or N / 2)) -> (M, N), or (M, N / 2) with glu; with rope, heads = (B, n, q heads,
    k/v heads, head dim) and the outputs [q, k, v], each (B, heads, n, head dim)."""
    M, K = x.shape
    N = w.shape[0] // 2 if fused.glu else w.shape[0]
    cols_per_warp = 2 if fused.rope else cols_per_warp  # the pair RoPE rotates
    rows_per_warp = min(rows_per_warp, M)
    warps = -(-N // cols_per_warp) * -(-M // rows_per_warp)
    threads = WARPS_PER_BLOCK * 32
    grid = -(-warps * 32 // threads) * threads
    template = [("T", w.dtype), ("K", K), ("N", w.shape[0]), ("ROWS", rows_per_warp), ("COLS", cols_per_warp)]
    shapes = [(M, N)]
    if fused.rope:
        B, n, nq, nkv, hd = heads
        template += [("NQ", nq), ("NKV", nkv), ("HD", hd)]
        shapes = [(B, nq, n, hd), (B, nkv, n, hd), (B, nkv, n, hd)]
    outs = _get_kernel(fused)(
        inputs=[x, w, *extra], template=template, grid=(grid, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=shapes, output_dtypes=[w.dtype] * len(shapes),
    )
    return outs if fused.rope else outs[0]


def _epilogue(y: mx.array, residual=None, glu: bool = False, silu: bool = False) -> mx.array:
    if glu:
        gate, up = mx.split(y, 2, axis=-1)
        y = nn.silu(gate) * up
    elif silu:
        y = nn.silu(y)
    return y if residual is None else residual + y


def reference(x, w, gamma=None, eps: float = 0.0, bias=None, residual=None, glu: bool = False, silu: bool = False):
    """What `fused_linear` computes, in MLX ops on arrays (tests compare the kernel with it)."""
    if gamma is not None:
        x = mx.fast.rms_norm(x, gamma, eps)
    y = x @ w.T if bias is None else mx.addmm(bias, x, w.T)
    return _epilogue(y, residual, glu, silu)


def fused_linear(layer: nn.Module, x: mx.array, norm: Optional[nn.Module] = None, residual: Optional[mx.array] = None,
                 glu: bool = False, silu: bool = False) -> mx.array:
    """residual + act(layer(norm(x))), act none, silu or glu (silu(first half of the outputs) * second
    half): one kernel launch where the kernel `fits` (the base model's projections in a verify, the
    drafter's ResBlocks), else exactly these ops with any layer (quantized too) and RMSNorm.

    >>> h = fused_linear(mlp.gate_up_proj, x, norm=layer.post_attention_layernorm, glu=True)   # (..., I)
    >>> x = fused_linear(mlp.down_proj, h, residual=x)                                         # (..., H)
    """
    out = _fused_kernel(layer, x, norm, residual, glu, silu) if FUSE else None
    if out is not None:
        return out
    y = layer(x if norm is None else norm(x))
    return _epilogue(y, residual, glu, silu)


def _takes(layer, x, norm) -> bool:
    """Whether the kernel takes layer(norm(x)): our Linear where it `fits`, an RMSNorm and a bias of its dtype."""
    w, K = getattr(layer, "weight", None), x.shape[-1]
    if type(layer) is not Linear or not fits(x.size // K, K, x.dtype, w):
        return False
    if norm is not None and (type(norm) is not nn.RMSNorm or norm.weight.dtype != w.dtype or norm.weight.shape != (K,)):
        return False
    # (MLX's addmm would promote another dtype, or broadcast another shape)
    return "bias" not in layer or (layer.bias.dtype == w.dtype and layer.bias.shape == (w.shape[0],))


def _norm_and_bias(layer, norm, bias: bool) -> Tuple[dict, list]:
    """`Fused`'s norm, eps and bias fields, and their inputs in the kernel's order (gamma, then bias)."""
    flags = {"norm": norm is not None, "eps": float(norm.eps) if norm is not None else 0.0, "bias": bias}
    return flags, ([norm.weight] if norm is not None else []) + ([layer.bias] if bias else [])


def _fused_kernel(layer, x, norm, residual, glu, silu) -> Optional[mx.array]:
    """The one launch, or None where it doesn't fit."""
    if not _takes(layer, x, norm):
        return None
    w, K = layer.weight, x.shape[-1]
    rows = x.size // K
    N = w.shape[0] // 2 if glu else w.shape[0]
    if glu and w.shape[0] % 2:
        return None
    if residual is not None and (residual.dtype != w.dtype or residual.shape != (*x.shape[:-1], N)):
        return None
    bias = "bias" in layer
    fuse_bias = bias and FUSE  # "unfused": the bias is its own op, as before the fusion
    flags, extra = _norm_and_bias(layer, norm, fuse_bias)
    if residual is not None:
        extra.append(residual.reshape(rows, N))
    fused = Fused(**flags, glu=glu, silu=silu and not glu, residual=residual is not None)
    out = _launch(x.reshape(rows, K), w, fused, tuple(extra)).reshape(*x.shape[:-1], N)
    return out + layer.bias if bias and not fuse_bias else out


def qkv_rope(layer, x: mx.array, norm, rope, positions, heads: int, kv_heads: int) -> Optional[Tuple[mx.array, ...]]:
    """q (B, heads, n, D), k and v (B, kv_heads, n, D) from x (B, n, H): the norm, the joined q/k/v
    projection, RoPE of q and k at positions (B, n) and the head-major layout, in one launch where the
    kernel takes it (nn.RoPE, not traditional, over the whole head); None elsewhere, and the caller runs
    those ops (`llama.Attention`)."""
    if not (FUSE and isinstance(positions, mx.array) and mx.issubdtype(positions.dtype, mx.integer)
            and type(rope) is nn.RoPE and not rope.traditional):
        return None
    B, n, K = x.shape
    if not _takes(layer, x, norm):
        return None
    D = layer.weight.shape[0] // (heads + 2 * kv_heads)
    if D * (heads + 2 * kv_heads) != layer.weight.shape[0] or rope.dims != D or D % 2 or positions.shape != (B, n):
        return None
    flags, extra = _norm_and_bias(layer, norm, "bias" in layer)
    extra += [positions.astype(mx.int32), _inv_freq(float(rope.base), float(rope.scale), D)]
    fused = Fused(**flags, rope=True)
    return tuple(_launch(x.reshape(B * n, K), layer.weight, fused, tuple(extra), heads=(B, n, heads, kv_heads, D)))


_INV_FREQ = {}


def _inv_freq(base: float, scale: float, dims: int) -> mx.array:
    """scale * base^(-2i / dims) for i < dims / 2 (fp32): the angle per position of mx.fast.rope's pair i."""
    key = (base, scale, dims)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = mx.array(scale * base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims), dtype=mx.float32)
    return _INV_FREQ[key]


def reference_qkv_rope(x, w, gamma, eps: float, bias, positions, inv_freq, heads: int, kv_heads: int):
    """What `qkv_rope` computes, in MLX ops on arrays: x (B, n, H) -> q, k, v (B, heads, n, D)."""
    B, n, _ = x.shape
    qkv = reference(x, w, gamma, eps, bias).reshape(B, n, heads + 2 * kv_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = mx.split(qkv, [heads, heads + kv_heads], axis=1)
    return rotate(q, positions, inv_freq), rotate(k, positions, inv_freq), v


def rotate(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    """x (B, heads, n, D) with each pair (i, i + D / 2) rotated by positions (B, n) * inv_freq[i]: RoPE as
    `qkv_rope`'s kernel computes it (tests compare it with mx.fast.rope)."""
    theta = positions[:, None, :, None].astype(mx.float32) * inv_freq
    cos, sin = mx.cos(theta), mx.sin(theta)
    a, b = mx.split(x.astype(mx.float32), 2, axis=-1)
    return mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose few-row calls run the kernel on a CUDA GPU.

    The base model's projections in a verify forward and the drafter's layers over W beams see a
    few dozen rows; on every other backend and row count this is nn.Linear.
    """

    def __call__(self, x: mx.array) -> mx.array:
        out = _fused_kernel(self, x, None, None, False, False)
        return super().__call__(x) if out is None else out


def swap_linears(module: nn.Module, kind: type) -> nn.Module:
    """`module` with each Linear inside it (nn.Linear or this Linear) made a `kind` on the same arrays.

    mlx-lm's `dequantize_model` makes plain nn.Linear layers: loading turns them into this Linear;
    benchmarks turn them back to compare against MLX's own matmul.
    """
    def swapped(m):
        if type(m) not in (nn.Linear, Linear) or type(m) is kind:
            return m
        new = kind(1, 1, bias="bias" in m)
        new.update(m.parameters())
        return new

    for _, parent in module.named_modules():
        for key, child in parent.items():   # not children(): it copies lists
            if isinstance(child, list):
                child[:] = [swapped(m) for m in child]
            elif isinstance(child, nn.Module):
                parent[key] = swapped(child)
    return module
