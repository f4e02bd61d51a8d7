"""What makes a tree-verify pass cost more than a plain decode step, one ingredient at a time.

    python benchmarks/verify_variants.py [--model M] [--n 16] [--context 300]

Times (ms, warmed, each evaluated on its own) a 1-token decode, then an n-token
forward with: an int offset and causal mask; per-token positions; a boolean
tree mask over exactly the used slots; the same over a fixed span; an additive
mask; and the accept/commit ops alone. Saves results/verify_variants-<device>.json.
"""

import argparse
import json
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
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
    logits = mx.zeros((n, model.args.vocab_size), dtype=dtype)
    variants["argmax over tree logits"] = lambda: mx.eval(mx.argmax(logits, axis=-1))
    rows = {name: timed(fn, 20) for name, fn in variants.items()}
    for name, ms in rows.items():
        print(f"{ms:8.2f} ms  {name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if backend.on_gpu() else "cpu"
    (out / f"verify_variants-{device}.json").write_text(json.dumps({"n": n, "context": c, "ms": rows}, indent=2))


if __name__ == "__main__":
    main()
