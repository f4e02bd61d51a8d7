"""How fast distillation data is made at several generation batch sizes (`train --gen-batch-size`):
the base model's replies (`distill.batch_generate`, greedy or sampled) to MT-Bench's first turns,
repeated to fill the batches, prompts and tokens per second.

    python benchmarks/data_throughput.py [--batches 256,512,1024] [--prompts-per-batch-size 1024] [--temp 0.7]

Prints a table and saves results/data-throughput-<device>.json (--out).
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import backend, load
from mlx_redrafter.generate import encode_messages
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.distill import batch_generate
from mlx_redrafter.outputs import write_file
from mlx_redrafter.sampling import SamplingConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--prompts", type=Path)
    p.add_argument("--batches", default="256,512,1024")
    p.add_argument("--prompts-per-batch-size", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model, tok = load(args.model, drafter=None)
    texts = prompt_texts(args.prompts)
    encoded = [encode_messages(tok, [{"role": "user", "content": t}]) for t in texts]
    pool = [encoded[i % len(encoded)] for i in range(args.prompts_per_batch_size)]
    sampling, eos = SamplingConfig(temperature=args.temp), set(tok.eos_token_ids)
    batch_generate(model, pool[:8], 8, sampling, eos)  # warm the kernels
    rows = []
    for size in (int(b) for b in args.batches.split(",")):
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(pool), size):
            tokens += sum(len(r) for r in batch_generate(model, pool[i: i + size], args.max_new_tokens, sampling, eos))
        secs = time.perf_counter() - start
        rows.append({"batch": size, "prompts": len(pool), "seconds": secs, "prompts_per_s": len(pool) / secs,
                     "tokens_per_s": tokens / secs})
        print(f"batch {size:5d}: {len(pool) / secs:7.1f} prompts/s, {tokens / secs:9.0f} tokens/s ({secs:.1f} s)")
    out = args.out or Path(f"results/data-throughput-{'gpu' if backend.on_gpu() else 'cpu'}.json")
    write_file(out, json.dumps({"machine": backend.machine(), "temperature": args.temp,
                                "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
