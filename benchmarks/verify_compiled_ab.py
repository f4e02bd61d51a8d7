"""The verify forward compiled (`mx.compile`, one trace per shape) against eager, interleaved prompt by
prompt with mlx-lm plain, greedy and sampled, at the device's default shape (on the CPU: 4 x 4 + lookup,
`min_prob` 0.1, where the host builds the verify only after it has read the draft).

    python benchmarks/verify_compiled_ab.py [--every 10] [--max-tokens 128]

Prints per prompt and a summary (median and mean ratio to mlx-lm plain, identical outputs, tokens per step).
"""

import argparse
import statistics
import time

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import load
from mlx_redrafter.beam_search import default_shape
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.decoding import Decoder
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.reference import to_mlx_lm
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.speed import run_mlx_lm


def decode(decoder: Decoder, ids, max_tokens: int) -> dict:
    start, out, steps = time.perf_counter(), [], 0
    for emitted, _ in decoder.run([ids]):
        out += emitted[0]
        steps += 1
        if len(out) >= max_tokens:
            break
    return {"tps": len(out) / (time.perf_counter() - start), "tokens": out[:max_tokens], "steps": steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok, config = load(return_config=True)
    ref = to_mlx_lm(model, config)
    samplings = {"greedy": SamplingConfig(), "T=0.7": SamplingConfig(temperature=0.7, seed=0)}
    decoders = {(s, c): Decoder(model, model.drafter, default_shape(), cfg, compiled=c)
                for s, cfg in samplings.items() for c in (False, True)}
    ids = [encode_prompt(tok, p) for p in prompt_texts(None, every=args.every)]
    run_mlx_lm(ref, tok, ids[0], 16)
    for d in decoders.values():
        decode(d, ids[0], 32)
    runs, base = {k: [] for k in decoders}, []
    for n, prompt in enumerate(ids):
        base.append(run_mlx_lm(ref, tok, prompt, args.max_tokens))
        for k in (list(decoders) if n % 2 == 0 else list(decoders)[::-1]):  # alternate the order
            runs[k].append(decode(decoders[k], prompt, args.max_tokens))
        print(n, round(base[-1]["tps"], 2), {f"{s} {'compiled' if c else 'eager'}": round(rs[-1]["tps"], 2)
                                             for (s, c), rs in runs.items()}, flush=True)
    for (s, c), rs in runs.items():
        ratios = [r["tps"] / b["tps"] for r, b in zip(rs, base)]
        same = sum(r["tokens"] == b["tokens"][: args.max_tokens] for r, b in zip(rs, base))
        per_step = sum(len(r["tokens"]) for r in rs) / sum(r["steps"] for r in rs)
        print(f"{s} {'compiled' if c else 'eager'}: median ratio {statistics.median(ratios):.3f}, mean "
              f"{statistics.mean(ratios):.3f}, identical {same}/{len(rs)}, tokens/step {per_step:.2f}")


if __name__ == "__main__":
    main()
