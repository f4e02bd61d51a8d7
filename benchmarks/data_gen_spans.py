"""Distillation data generation with the key span growing one slot per token (every step a new
attention shape, as before) against spans rounded up (`kv_cache.device_span_step`), alternated
on the same prompts.

    python benchmarks/data_gen_spans.py --prompts sharegpt.jsonl.gz [--batch 512] [--rounds 2] [--out results/data-gen-spans.json]
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import distill, load
from mlx_redrafter.data import conversations
from mlx_redrafter.generate import encode_messages
from mlx_redrafter.kv_cache import device_span_step
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.speed import machine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("results/data-gen-spans.json"))
    args = ap.parse_args()
    model, tokenizer = load(args.model, drafter=None)
    convs = conversations(args.prompts, args.batch * args.rounds, all_turns=True)
    prompts = [encode_messages(tokenizer, c.messages())[-384:] for c in convs]
    eos, sampling = set(tokenizer.eos_token_ids), SamplingConfig(temperature=0.7, seed=0)
    rounded = device_span_step()
    distill.batch_generate(model, prompts[:8], 8, sampling, eos)  # warm-up
    rows = []
    for r in range(args.rounds):
        batch = sorted(prompts[r * args.batch: (r + 1) * args.batch], key=len)
        for name, step in (("one slot per token", 1), (f"{rounded}-slot spans", rounded)):
            distill.device_span_step = lambda step=step: step
            started = time.perf_counter()
            outs = distill.batch_generate(model, batch, args.max_new_tokens, sampling, eos)
            seconds = time.perf_counter() - started
            rows.append({"round": r, "spans": name, "prompts": len(batch), "seconds": round(seconds, 2),
                         "prompts_per_s": round(len(batch) / seconds, 1),
                         "tokens_per_s": round(sum(map(len, outs)) / seconds, 1)})
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
