"""Plain decoding speed: this project's decoder against mlx-lm's on the same weights and dtype.

    python benchmarks/plain_vs_mlx_lm.py [--model M] [--max-tokens 128] [--rounds 3]

Prints generation tokens/s for both, interleaved over rounds, and saves
results/plain_vs_mlx_lm-<device>.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (preloads the fast BLAS before mlx)
import mlx.core as mx

from mlx_redrafter import load
from mlx_redrafter.speed import run_mlx_lm, run_ours
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.reference import to_mlx_lm

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short story about a lighthouse keeper.",
    "List five tips for learning a new language.",
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    model, tok, config = load(args.model, drafter=None, return_config=True, dtype=args.dtype)
    ref = to_mlx_lm(model, config)
    prompts = [encode_prompt(tok, q) for q in PROMPTS]
    run_ours(model, tok, prompts[0], 16), run_mlx_lm(ref, tok, prompts[0], 16)  # warm up
    rows = {"ours": [], "mlx_lm": []}
    for r in range(args.rounds):
        for ids in prompts:
            for name, fn, m in (("mlx_lm", run_mlx_lm, ref), ("ours", run_ours, model)):
                result = fn(m, tok, ids, args.max_tokens)
                rows[name].append(result["tps"])
                print(f"round {r} {name:7s} {len(result['tokens']):4d} tokens {result['tps']:8.2f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["ours"] / med["mlx_lm"]
    print(f"median tok/s: ours {med['ours']:.2f}, mlx-lm {med['mlx_lm']:.2f}, ratio {ratio:.3f}")
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "dtype": str(model.model.norm.weight.dtype), "max_tokens": args.max_tokens,
              "tps": rows, "median": med, "ratio": ratio, "time": time.strftime("%Y-%m-%d %H:%M")}
    (out / f"plain_vs_mlx_lm-{device}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
