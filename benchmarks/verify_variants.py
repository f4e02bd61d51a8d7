"""What makes a tree-verify pass cost more than a plain decode step, one ingredient at a time.

    python benchmarks/verify_variants.py [--model M] [--n 16] [--context 300]

Times (ms, warmed, each evaluated on its own) a 1-token decode, then an n-token
forward with: an int offset and causal mask; per-token positions; a boolean
tree mask over exactly the used slots; the same over a fixed span; an additive
mask; the same forwards queued back to back (device time); the projections as seven
matmuls per layer or five (q/k/v and gate/up fused); the accept/commit ops alone. Saves results/verify_variants-<device>.json.
"""

import argparse
import json
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_redrafter import backend, load
from mlx_redrafter.kv_cache import KVCache

from cost_curves import timed  # noqa: E402  (a sibling script)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--out", default="results")
    args = p.parse_args()
    model = load(args.model, drafter=None)[0]
    n, c = args.n, args.context
    cache = model.make_cache()
    mx.eval(model(mx.zeros((1, c), dtype=mx.int32), cache))
    tokens = mx.zeros((1, n), dtype=mx.int32)
    positions = mx.arange(c, c + n)[None]
    exact = np.tril(np.ones((n, c + n), dtype=bool), k=c)
    span = KVCache.span_for(c + n)
    wide = np.zeros((n, span), dtype=bool)
    wide[:, : c + n] = exact
    dtype = backend.default_dtype()

    def forward(toks, pos=None, mask=None):
        def run():
            cache.truncate(c)
            mx.eval(model.logits(model(toks, cache, pos, mask)))
        return run

    variants = {
        "decode 1 token": forward(tokens[:, :1]),
        f"{n} tokens, offset, causal": forward(tokens),
        f"{n} tokens, positions, causal": forward(tokens, positions),
        f"{n} tokens, positions, bool mask (exact)": forward(tokens, positions, mx.array(exact)),
        f"{n} tokens, positions, bool mask (span {span})": forward(tokens, positions, mx.array(wide)),
        f"{n} tokens, positions, additive mask (span {span})": forward(
            tokens, positions, mx.where(mx.array(wide), 0.0, -mx.inf).astype(dtype)),
        f"{n} tokens, positions, bool mask built each call": lambda: forward(tokens, positions, mx.array(wide))(),
    }
    # host-side graph building: the same forward without a cache, eager and mx.compile'd
    plain = lambda t: model.logits(model(t))
    compiled = mx.compile(plain)
    for k in (1, n):
        variants[f"{k} tokens, no cache, eager"] = lambda k=k: mx.eval(plain(tokens[:, :k]))
        variants[f"{k} tokens, no cache, mx.compile"] = lambda k=k: mx.eval(compiled(tokens[:, :k]))
    for k in (1, n):  # queued back to back, one eval: the device's time rather than one round trip's
        variants[f"{k} tokens, no cache, mx.compile, 10 queued (per forward)"] = \
            lambda k=k: mx.eval([compiled(tokens[:, :k]) for _ in range(10)]) or None
    variants.update(projection_variants(model.args, n, dtype))
    logits = mx.zeros((n, model.args.vocab_size), dtype=dtype)
    variants["argmax over tree logits"] = lambda: mx.eval(mx.argmax(logits, axis=-1))
    rows = {name: timed(fn, 20) / (10 if "10 queued" in name else 1) for name, fn in variants.items()}
    for name, ms in rows.items():
        print(f"{ms:8.2f} ms  {name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if backend.on_gpu() else "cpu"
    (out / f"verify_variants-{device}.json").write_text(json.dumps({"n": n, "context": c, "ms": rows}, indent=2))


def projection_variants(args, n, dtype):
    """Every layer's projections for n rows, compiled and queued: q, k, v, o, gate, up, down as
    seven matmuls, or with q/k/v and gate/up fused into one matmul each (five)."""
    H, I, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    kv = args.num_key_value_heads * args.head_dim
    w = lambda o, i: (mx.random.normal((o, i)) * 0.02).astype(dtype)
    sep = [[w(H, H), w(kv, H), w(kv, H), w(H, H), w(I, H), w(I, H), w(H, I)] for _ in range(L)]
    fused = [[w(H + 2 * kv, H), w(H, H), w(2 * I, H), w(H, I)] for _ in range(L)]
    mx.eval(sep, fused)

    def seven(x, ws):
        for q, k, v, o, g, u, d in ws:
            a = x @ q.T + (x @ k.T).sum() + (x @ v.T).sum()
            x = x + a @ o.T
            x = x + (nn.silu(x @ g.T) * (x @ u.T)) @ d.T
        return x

    def five(x, ws):
        for qkv, o, gu, d in ws:
            a = x @ qkv.T
            x = x + (a[..., :H] + a[..., H:].sum()) @ o.T
            g, u = mx.split(x @ gu.T, 2, axis=-1)
            x = x + (nn.silu(g) * u) @ d.T
        return x

    out = {}
    for k in (1, n):
        x = mx.zeros((1, k, H), dtype)
        for name, fn, ws in (("7 matmuls", seven, sep), ("5 fused matmuls", five, fused)):
            f = mx.compile(fn)
            out[f"{k} rows, {L} layers' projections, {name}, 10 queued (per forward)"] = \
                lambda f=f, x=x, ws=ws: mx.eval([f(x, ws) for _ in range(10)]) or None
    return out


if __name__ == "__main__":
    main()
