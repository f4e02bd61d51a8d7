"""How much of the drafter's misses the reduced draft vocabulary explains: replayed along greedy
references (MT-Bench), the share of reference tokens outside the draft vocabulary, and at each shape
the share of steps that accept no drafted token whose first drafted target (the token after the
committed one) is outside it: such a step cannot accept anything, whatever the drafter learns.

    python benchmarks/draft_vocab_misses.py [--drafter DIR] [--every 2] [--max-tokens 256] \\
        [--shapes 4x4,32x6:32] [--out results/draft-vocab-misses.json]

Shapes are counted without the context-lookup beam (which can propose any token)."""

import argparse
from dataclasses import replace
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
import numpy as np

from mlx_redrafter import load
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.evaluate import greedy_references, replay_steps
from mlx_redrafter.outputs import write_file
from mlx_redrafter.speed import machine
from tree_modes import named_drafter, parse_setting  # benchmarks/: WxL[:NODES] settings, NAME=DIR drafters


def count(model, drafter, references, shape, in_vocab) -> dict:
    steps = zero = zero_out = out = 0
    for k, j, a in replay_steps(model, drafter, references, shape):
        reference = references[k][1]
        if j + 1 >= len(reference):
            continue  # the last token: nothing left to draft
        first_out = not in_vocab[reference[j + 1]]
        steps, out = steps + 1, out + first_out
        zero, zero_out = zero + (a == 0), zero_out + (a == 0 and first_out)
    return {"shape": f"{shape.width}x{shape.length}:{shape.nodes}", "steps": steps, "accept_none": zero / steps,
            "first_target_outside": out / steps, "accept_none_with_first_target_outside": zero_out / steps,
            "share_of_accept_none_explained": zero_out / max(zero, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--drafter", default="auto", help="DIR ('auto': the packaged one)")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--shapes", default="4x4,32x6:32")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/draft-vocab-misses.json"))
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    try:
        shapes = [replace(parse_setting(f"ranked:{t}", False), lookup=False) for t in args.shapes.split(",")]
    except ValueError:
        raise SystemExit(f"error: a shape is WxL[:NODES] (e.g. 4x4, 32x6:32), got {args.shapes!r}") from None
    model, tokenizer = load(args.model, drafter=None, dtype=args.dtype)
    _, drafter = named_drafter(f"d={args.drafter}", args.model, model, "--drafter")
    if not drafter.config.draft_vocab_size:
        raise SystemExit("error: this drafter drafts over the whole vocabulary: nothing is outside it")
    in_vocab = np.zeros(model.args.vocab_size, dtype=bool)
    in_vocab[np.array(drafter.draft_to_token)] = True
    started = time.perf_counter()
    references = greedy_references(model, tokenizer, prompt_texts(args.prompts, None, args.every), args.max_tokens)
    tokens = [t for _, r in references for t in r]
    rows = [count(model, drafter, references, shape, in_vocab) for shape in shapes]
    result = {"machine": machine(), "drafter": getattr(drafter, "source", args.drafter), "prompts": len(references),
              "every": args.every, "max_tokens": args.max_tokens, "draft_vocab": int(drafter.config.draft_vocab_size),
              "reference_tokens": len(tokens), "reference_tokens_outside": float(np.mean(~in_vocab[tokens])),
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    print(f"reference tokens outside the {result['draft_vocab']}-token draft vocabulary: "
          f"{result['reference_tokens_outside']:.1%} of {len(tokens)}")
    for r in rows:
        print(f"{r['shape']:>10}: {r['accept_none']:.1%} of {r['steps']} steps accept nothing; "
              f"{r['accept_none_with_first_target_outside']:.1%} of steps had their first target outside "
              f"({r['share_of_accept_none_explained']:.0%} of those that accept nothing)")
    write_file(args.out, json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
