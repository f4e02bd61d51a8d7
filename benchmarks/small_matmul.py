"""Projections for a few dozen rows on the GPU: MLX's matmul against `cuda_matmul.rows_matmul`.

    python benchmarks/small_matmul.py [--rows 1,8,16,32,38,48,64] [--layers 30]

For each row count M, times (compiled, each call evaluated, median of --reps) a chain of
`--layers` blocks of SmolLM2-135M's four projection shapes (fused q/k/v 960x576, o 576x576,
fused gate/up 3072x576, down 576x1536) in fp16, through: MLX's matmul (`x @ w.T`), a batched
one-row trick (each row a batch of MLX's gemv), and this package's kernel at several warp tilings (rows x columns per warp). Prints microseconds
per matmul and the largest error against an fp32 reference; then whole layer bodies (attention
left out) with and without `cuda_matmul.fused_linear`'s fusion, microseconds per layer. Saves --out (default
results/small-matmul-gpu.json; an existing file is refused, not replaced).
On a machine without a CUDA GPU it says so and stops: there the kernel never runs.
"""

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

import mlx.nn as nn

from mlx_redrafter import cuda_matmul
from mlx_redrafter.cuda_matmul import Linear, fused_linear, on_cuda, rows_matmul
from mlx_redrafter.outputs import write_file

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def mlx_mm(x, w):
    return x @ w.T


def batched_gemv(x, w):
    M, K = x.shape
    rows = mx.as_strided(x, (M, 1, K), (K, 1, 1))  # "transposed" 1-row views: MLX keeps them batched
    return (rows @ mx.broadcast_to(w.T, (M, K, w.shape[0]))).reshape(M, -1)


METHODS = {"mlx": mlx_mm, "batched-gemv": batched_gemv} | {
    f"kernel r{r}c{c}": partial(rows_matmul, rows_per_warp=r, cols_per_warp=c)
    for r, c in [(4, 2), (8, 1), (8, 2), (8, 4), (16, 2), (64, 2)]}


def chain(mm, weights, layers):
    qkv, o, gate_up, down = weights

    def run(x):
        for _ in range(layers):
            h = mm(mm(x, qkv)[:, :576], o)
            x = mm(mm(h, gate_up)[:, :1536], down)
        return x
    return run


def layer_chain(weights, layers, fuse: bool):
    """`--layers` layer bodies without attention (norm, q/k/v, o + residual, norm, gate/up, silu * up,
    down + residual) through `cuda_matmul.fused_linear`: one launch per projection with `fuse`, else the
    kernel for the projections and MLX ops around them."""
    qkv, o, gate_up, down = (Linear(1, 1, bias=False) for _ in weights)
    for layer, w in zip((qkv, o, gate_up, down), weights):
        layer.weight = w
    norm1, norm2 = nn.RMSNorm(576), nn.RMSNorm(576)
    norm1.weight = norm2.weight = mx.ones((576,), mx.float16)

    def run(x):
        saved, cuda_matmul.FUSE = cuda_matmul.FUSE, fuse  # read while the chain is traced, then restored
        try:
            for _ in range(layers):
                h = fused_linear(o, fused_linear(qkv, x, norm1)[:, :576], residual=x)
                x = fused_linear(down, fused_linear(gate_up, h, norm2, glu=True), residual=h)
            return x
        finally:
            cuda_matmul.FUSE = saved
    return run


def median_seconds(f, x, reps: int) -> float:
    """Median wall time of f(x) evaluated, after three warm-up calls."""
    for _ in range(3):
        mx.eval(f(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(f(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,16,32,38,48,64")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("results/small-matmul-gpu.json"))
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    if not on_cuda():
        raise SystemExit("error: small_matmul.py compares MLX CUDA's matmul with the CUDA kernel; "
                         f"MLX's default device here is {mx.default_device()}, where the kernel never runs")
    weights = [(mx.random.normal(s) * s[1] ** -0.5).astype(mx.float16) for s in SHAPES]
    mx.eval(weights)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for M in rows:
        x = mx.random.normal((M, 576)).astype(mx.float16)
        ref = {}
        for w in weights:  # one matmul per shape, for accuracy
            xin = x if w.shape[1] == 576 else mx.random.normal((M, 1536), key=mx.random.key(1)).astype(mx.float16)
            ref[w.shape] = (xin, (xin.astype(mx.float32) @ w.astype(mx.float32).T))
        for name, mm in METHODS.items():
            err = 0.0
            try:
                for w in weights:
                    xin, want = ref[w.shape]
                    got = mm(xin, w).astype(mx.float32)
                    err = max(err, (mx.abs(got - want).max() / mx.abs(want).max()).item())
                seconds = median_seconds(mx.compile(chain(mm, weights, args.layers)), x, args.reps)
                row = {"rows": M, "method": name, "us_per_matmul": round(seconds / (args.layers * len(weights)) * 1e6, 2),
                       "chain_ms": round(seconds * 1e3, 3), "rel_err": err}
            except Exception as e:  # noqa: BLE001  (report and go on: a benchmark)
                row = {"rows": M, "method": name, "error": str(e)[:300]}
            print(json.dumps(row), flush=True)
            results.append(row)
        for fuse in (False, True):  # whole layer bodies: the fusion's launches saved
            seconds = median_seconds(mx.compile(layer_chain(weights, args.layers, fuse)), x, args.reps)
            row = {"rows": M, "method": f"layer body, {'fused' if fuse else 'unfused'}",
                   "us_per_layer": round(seconds / args.layers * 1e6, 2)}
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out, json.dumps(results, indent=1))
    print("saved", args.out)


if __name__ == "__main__":
    main()
