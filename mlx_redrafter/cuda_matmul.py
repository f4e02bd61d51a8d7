"""A matmul for a few dozen rows on MLX's CUDA backend: ``x (M, K) @ w (N, K).T -> (M, N)``.

Why: MLX CUDA sends any matmul of more than one row to cuBLASLt. For a 135M model's
projections on two H200 hosts that cost 16-23 us for 32-48 rows against 6-7 us for MLX's one-row
kernel (`benchmarks/small_matmul.py`), and a verify forward is 120 of them: the tree cost
about twice a plain token for launch and tiling overhead, not arithmetic. Here each warp
computes two output columns for four rows (8 halves per lane per load, fp32 accumulation),
12-16 us at those row counts; end to end the GPU step went from 2.6 to 1.8 plain tokens.

Only used where ``available()`` (a CUDA GPU, fp16 weights of at most 16 MiB (the dtype measured
on the GPU; bf16 and fp32 keep cuBLAS), K a multiple of 8, 2 <= M <= MAX_ROWS, and ``MLX_REDRAFTER_ROWS_MATMUL`` not ``off``); everything else, Metal
and the CPU included, keeps ``x @ w.T``.

>>> x = mx.random.normal((38, 576)).astype(mx.float16); w = mx.random.normal((960, 576)).astype(mx.float16)
>>> rows_matmul(x, w).shape    # == (x @ w.T).shape on every backend
(38, 960)
"""

import os
import re
import sys

import mlx.core as mx
import mlx.nn as nn

MAX_ROWS = 64  # at 64 rows cuBLAS measured 15.5 us against the kernel's 17.5; 49-63 rows unmeasured
# Warps of different rows read the same weights again, from L2 while they fit there: larger
# matrices (a 7B model's) stay with cuBLAS, which reads them once.
MAX_WEIGHT_BYTES = 16 * 2**20
ENABLED = os.environ.get("MLX_REDRAFTER_ROWS_MATMUL", "on").lower() not in ("off", "0", "no", "false")


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
    // warp w: columns [n0, n0 + COLS) of rows [m0, m0 + ROWS); neighbouring warps share rows (L1)
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    constexpr int col_groups = (N + COLS - 1) / COLS;
    const int n0 = (warp % col_groups) * COLS;
    const int m0 = (warp / col_groups) * ROWS;
    if (m0 >= M) return;
    float acc[COLS][ROWS];
    #pragma unroll
    for (int c = 0; c < COLS; ++c) {
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[c][r] = 0.0f;
    }
    for (int k = lane * 8; k < K; k += 256) {
        float wv[COLS][8];
        #pragma unroll
        for (int c = 0; c < COLS; ++c) {
            if (n0 + c < N) {
                load8(w + (size_t)(n0 + c) * K + k, wv[c]);
            } else {
                #pragma unroll
                for (int j = 0; j < 8; ++j) wv[c][j] = 0.0f;
            }
        }
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (M % ROWS == 0 || m0 + r < M) {
                float xv[8];
                load8(x + (size_t)(m0 + r) * K + k, xv);
                #pragma unroll
                for (int c = 0; c < COLS; ++c) {
                    #pragma unroll
                    for (int j = 0; j < 8; ++j) acc[c][r] += wv[c][j] * xv[j];
                }
            }
        }
    }
    #pragma unroll
    for (int c = 0; c < COLS; ++c) {
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[c][r];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            if (lane == ((c * ROWS + r) & 31) && n0 + c < N && m0 + r < M)
                out[(size_t)(m0 + r) * N + n0 + c] = static_cast<T>(v);
        }
    }
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

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="redrafter_rows_matmul", input_names=["x", "w"], output_names=["out"],
            source=_SOURCE, header=_HEADER,
        )
    return _kernel


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
    return _launch(x, w, rows_per_warp, cols_per_warp)


def _launch(x: mx.array, w: mx.array, rows_per_warp: int = ROWS_PER_WARP, cols_per_warp: int = COLS_PER_WARP) -> mx.array:
    M, K = x.shape
    N = w.shape[0]
    rows_per_warp = min(rows_per_warp, M)
    warps = -(-N // cols_per_warp) * -(-M // rows_per_warp)
    threads = WARPS_PER_BLOCK * 32
    grid = -(-warps * 32 // threads) * threads
    (out,) = _get_kernel()(
        inputs=[x, w],
        template=[("T", w.dtype), ("M", M), ("K", K), ("N", N),
                  ("ROWS", rows_per_warp), ("COLS", cols_per_warp)],
        grid=(grid, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=[(M, N)], output_dtypes=[w.dtype],
    )
    return out


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose few-row calls run the kernel on a CUDA GPU.

    The base model's projections in a verify forward and the drafter's layers over W beams see a
    few dozen rows; on every other backend and row count this is nn.Linear.
    """

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if not fits(rows, x.shape[-1], x.dtype, self.weight):
            return super().__call__(x)
        y = _launch(x.reshape(rows, -1), self.weight).reshape(*x.shape[:-1], -1)
        return y + self.bias if "bias" in self else y


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
