"""Cost curves: verify time against tree tokens and drafter time against W x Lb, for the default
model or a random-weight model of a given shape and precision (e.g. --shape llama-3-8b --bits 4 on
the GPU). With tokens per step measured at several node budgets (on the default model) it
estimates the speedup a model of that shape would see at each budget, and the best budget: an
estimate, not a measurement (the acceptance is the default drafter's, the costs are this shape's).

    python benchmarks/cost_curves.py [--shape default|llama-7b|llama-3-8b] [--bits 0|8|4]
        [--acceptance 16:3.29,32:3.42,48:3.72,96:3.95] [--width 32 --length 6] [--out results/cost-curves.json]
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401
import mlx.core as mx
import mlx.nn as nn

from mlx_redrafter import backend, load
from mlx_redrafter.beam_search import BeamShape, draft_levels
from mlx_redrafter.drafter import DrafterConfig, init_drafter
from mlx_redrafter.llama import Model, ModelArgs, fuse_projections
from mlx_redrafter.loading import cast
from mlx_redrafter.outputs import write_file
from mlx_redrafter.speed import machine

SHAPES = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
TREE_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# GPU speed runs of the default drafter on MT-Bench (README, Speed): tokens per step by node budget
MEASURED_ACCEPTANCE = "24:3.29,32:3.42,48:3.72,96:3.95"


def timed(fn, repeat=10):
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - t) / repeat


def verify_ms(model, n, context=256):
    """One forward of n tree tokens after `context` cached ones, logits included."""
    cache = model.make_cache()
    mx.eval(model(mx.zeros((1, context), dtype=mx.int32), cache))
    tokens = mx.zeros((1, n), dtype=mx.int32)
    mask = mx.ones((n, context + n), dtype=mx.bool_)
    positions = mx.arange(context, context + n)[None]

    def step():
        cache.truncate(context)
        mx.eval(model.logits(model(tokens, cache, positions if n > 1 else None, mask if n > 1 else None)))

    return timed(step)


def base_model(shape: str, bits: int):
    if shape == "default":
        model = load(drafter=None, dequantize=bits == 0)[0]
    else:
        model = Model(ModelArgs.from_dict(SHAPES[shape]))
        fuse_projections(model)
        cast(model, backend.default_dtype())
    if bits and shape != "default":
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def estimate(verify: dict, draft: float, acceptance: dict) -> dict:
    """Speedup over plain decoding at each node budget: tokens per step x plain token / (verify + draft)."""
    rows = {}
    for nodes, tps in acceptance.items():
        tree = nodes + 6  # + the root and the lookup beam's tokens
        n = min((k for k in verify if k >= tree), default=max(verify))  # the measured size that holds the tree
        rows[nodes] = {"tokens_per_step": tps, "tree_tokens": n, "step_ms": verify[n] + draft,
                       "speedup_estimate": tps * verify[1] / (verify[n] + draft)}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="default", choices=["default", *SHAPES])
    p.add_argument("--bits", type=int, default=0, choices=[0, 4, 8], help="0: the float dtype; 8 or 4: quantized weights")
    p.add_argument("--acceptance", default=MEASURED_ACCEPTANCE, help="NODES:TOKENS_PER_STEP,... measured elsewhere")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--length", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("results/cost-curves.json"))
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    model = base_model(args.shape, args.bits)
    a = model.args
    drafter = init_drafter(DrafterConfig(a.vocab_size, a.hidden_size, 2 * a.hidden_size, 2,
                                         draft_vocab_size=min(4096, a.vocab_size)), model)
    cast(drafter, backend.default_dtype())
    verify = {n: verify_ms(model, n) for n in TREE_TOKENS}
    print("verify ms by tree tokens:", {k: round(v, 2) for k, v in verify.items()}, flush=True)
    hidden = mx.zeros((1, a.hidden_size), dtype=backend.default_dtype())
    shape = BeamShape(args.width, args.length)
    draft = timed(lambda: mx.eval(draft_levels(drafter, model, hidden, mx.array([1]), shape)))
    print(f"drafter ms at {args.width} x {args.length}: {draft:.2f}", flush=True)
    acceptance = {int(k): float(v) for k, v in (item.split(":") for item in args.acceptance.split(","))}
    rows = estimate(verify, draft, acceptance)
    best = max(rows, key=lambda k: rows[k]["speedup_estimate"])
    for nodes, r in rows.items():
        print(f"ESTIMATE {nodes} nodes: {r['tokens_per_step']} tokens/step, step {r['step_ms']:.2f} ms against "
              f"{verify[1]:.2f} ms a plain token: ~{r['speedup_estimate']:.2f}x" + (" (best)" if nodes == best else ""))
    write_file(args.out, json.dumps({
        "shape": args.shape, "bits": args.bits, "machine": machine(), "dtype": str(backend.default_dtype()),
        "verify_ms": verify, "draft_ms": {f"{args.width}x{args.length}": draft},
        "estimate": {"note": "acceptance measured on the default model, costs on this shape", "rows": rows,
                     "best_nodes": best}}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
