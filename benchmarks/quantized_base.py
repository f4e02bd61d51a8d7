"""The default drafter's acceptance when the base model runs quantized (issue 15, item 4).

The default model exists here only as its Q4_1 GGUF, so the bases compared hold the same weights
computed three ways: dequantized to the float dtype (what `load` does on the CPU and for small
models), kept 4-bit (MLX's quantized matmul on the GGUF's own 4-bit groups), and re-quantized to
8 bits (group 64) from the dequantized weights, as `convert base --quantize --q-bits 8` would.
Each base is counted along its own greedy references (replayed), with and without lookup.

    python benchmarks/quantized_base.py [--every 4] [--max-tokens 128] [--shape 4x4] [--out results/quantized-base.json]
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn

from mlx_redrafter import load
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.evaluate import greedy_references, replay_acceptance
from mlx_redrafter.outputs import write_file
from mlx_redrafter.speed import machine


def bases(model_path, dtype):
    """(name, base model) for each way of computing the same weights; the drafter rides on the first."""
    plain, tokenizer = load(model_path, drafter="auto", dtype=dtype, dequantize=True)
    yield "dequantized", plain, tokenizer
    kept, _ = load(model_path, drafter=None, dtype=dtype, dequantize=False)
    yield "4-bit (kept)", kept, tokenizer
    requantized, _ = load(model_path, drafter=None, dtype=dtype, dequantize=True)
    nn.quantize(requantized, group_size=64, bits=8)
    mx.eval(requantized.parameters())
    yield "8-bit (re-quantized)", requantized, tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--shape", default="4x4")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/quantized-base.json"))
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    w, length = (int(v) for v in args.shape.split("x"))
    texts = prompt_texts(args.prompts, None, args.every)
    rows, drafter, first = [], None, None
    for name, base, tokenizer in bases(args.model, args.dtype):
        drafter = drafter or base.drafter
        started = time.perf_counter()
        refs = greedy_references(base, tokenizer, texts, args.max_tokens)
        first = first or refs
        same = sum(r[1] == f[1] for r, f in zip(refs, first))
        for lookup in (False, True):
            r = replay_acceptance(base, drafter, refs, BeamShape(w, length, lookup))
            rows.append({"base": name, "lookup": lookup, "tokens_per_step": r["tokens_per_step"],
                         "references_equal_to_dequantized": same, "prompts": len(texts),
                         "accept_at_least": r["accept_at_least"]})
            print(f"{name:>22} lookup={lookup!s:5} {r['tokens_per_step']:.2f} tokens/step "
                  f"({same}/{len(texts)} references equal to the dequantized base's)", flush=True)
        rows[-1]["seconds"] = round(time.perf_counter() - started, 1)
    write_file(args.out, json.dumps({"machine": machine(), "shape": args.shape, "every": args.every,
                                    "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
