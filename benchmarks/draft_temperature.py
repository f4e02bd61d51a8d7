"""Does tempering the drafter's scores pay? The beam search and the ranked tree order prefixes by the
drafter's log-probabilities; here its logits are divided by tau first (tau < 1 sharpens: budget to deep
chains; tau > 1 flattens: budget to siblings) and the acceptance counted, greedy (replayed along greedy
references) and sampled (decoded; also the *expected* accepted tokens per step, the sum over drafted
nodes of the probability that the base model's draws walk to them, which has no draw noise).

    python benchmarks/draft_temperature.py [--drafter auto] [--taus 0.7,1,1.3] [--shapes 4x4,32x6:32] \\
        [--sampled-shape 32x6:32] [--temp 0.7] [--out results/cpu/drafters/draft-temperature.json]

Only an experiment: the decoder always ranks by the untempered log-probabilities (tau = 1).
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np

from mlx_redrafter import load
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.decoding import Decoder
from mlx_redrafter.evaluate import greedy_references, replay_acceptance
from mlx_redrafter.generate import encode_prompts
from mlx_redrafter.outputs import write_file
from mlx_redrafter.sampling import SamplingConfig, target_probs
from mlx_redrafter.speed import machine
from tree_modes import named_drafter, parse_setting  # benchmarks/


class Tempered:
    """The drafter with its draft logits divided by tau (everything else its own)."""

    def __init__(self, drafter, tau: float):
        self._drafter, self._tau = drafter, tau

    def __call__(self, *args):
        return self._drafter(*args) / self._tau

    def __getattr__(self, name):
        return getattr(self._drafter, name)


def expected_accepted(tree, logits, sampling: SamplingConfig) -> mx.array:
    """(B,) drafted tokens a step accepts on average over the base model's draws: each drafted node is
    accepted when its token and its ancestors' were drawn at their parents (siblings are distinct)."""
    p = target_probs(logits, sampling)  # (B, N, V)
    at_parent = mx.take_along_axis(p, tree.parents[:, :, None], axis=1)
    drawn = mx.take_along_axis(at_parent, tree.tokens[:, :, None], axis=2)[..., 0]  # (B, N)
    root = mx.arange(drawn.shape[1]) == 0
    log_p = mx.log(mx.where(root, 1.0, mx.where(tree.live, drawn, 0.0)))
    reach = mx.exp(mx.where(tree.ancestors, log_p[:, None, :], 0.0).sum(-1))
    return mx.where(root, 0.0, reach).sum(-1)


def sampled_steps(decoder: Decoder, prompts, max_tokens: int, eos: set, seed: int):
    """(accepted, expected accepted) per step of sampled decoding, the decoder's phases called one by one."""
    accepted, expected = [], []
    for k, prompt in enumerate(prompts):
        mx.random.seed(seed * 100_003 + k)
        state, tokens = decoder.prefill([prompt]), 0
        while tokens < max_tokens:
            tree = decoder.draft(state)
            hidden, logits = decoder.verify(state, tree)
            mean = expected_accepted(tree, logits, decoder.sampling)
            state, emitted = decoder.commit(state, tree, hidden, logits)
            count = int(emitted.count[0])
            state.cache.bound = int(state.cache.lengths.max()) + decoder.shape.emit_length
            accepted.append(count)
            expected.append(float(mean[0]))
            tokens += count + 1
            if eos & set(np.array(emitted.tokens[0])[: count + 1].tolist()):
                break
    return accepted, expected


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--drafter", default="auto", help="DIR, or auto: the packaged one")
    ap.add_argument("--taus", default="0.7,1,1.3")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--shapes", default="4x4,32x6:32", help="greedy, replayed, without the lookup beam")
    ap.add_argument("--sampled-shape", default="32x6:32", help="sampled, decoded, with the lookup beam")
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--sampled-every", type=int, default=8)
    ap.add_argument("--sampled-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/cpu/drafters/draft-temperature.json"))
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    taus = [float(t) for t in args.taus.split(",")]
    model, tokenizer = load(args.model, drafter=None)
    _, drafter = named_drafter(f"d={args.drafter}", args.model, model, "--drafter")
    started, rows = time.perf_counter(), []
    references = greedy_references(model, tokenizer, prompt_texts(args.prompts, None, args.every), args.max_tokens)
    sampled = encode_prompts(model, tokenizer, prompt_texts(args.prompts, None, args.sampled_every), args.sampled_tokens)
    for tau in taus:
        tempered = Tempered(drafter, tau)
        for text in args.shapes.split(","):
            r = replay_acceptance(model, tempered, references, parse_setting(f"ranked:{text}", False), progress=False)
            rows.append({"tau": tau, "shape": text, "temperature": 0.0, "tokens_per_step": r["tokens_per_step"]})
            print(f"tau {tau:<4} {text:>10} greedy  {r['tokens_per_step']:.3f}", flush=True)
        decoder = Decoder(model, tempered, parse_setting(f"ranked:{args.sampled_shape}", True),
                          SamplingConfig(temperature=args.temp))
        accepted, expected = sampled_steps(decoder, sampled, args.sampled_tokens, set(tokenizer.eos_token_ids), args.seed)
        rows.append({"tau": tau, "shape": args.sampled_shape + "+lookup", "temperature": args.temp, "steps": len(accepted),
                     "tokens_per_step": 1 + float(np.mean(accepted)), "expected_tokens_per_step": 1 + float(np.mean(expected))})
        print(f"tau {tau:<4} {args.sampled_shape + '+lookup':>10} T={args.temp} {rows[-1]['tokens_per_step']:.3f} "
              f"(expected {rows[-1]['expected_tokens_per_step']:.3f})", flush=True)
    write_file(args.out, json.dumps({
        "machine": machine(), "drafter": getattr(drafter, "source", args.drafter), "greedy_prompts": len(references),
        "max_tokens": args.max_tokens, "sampled_prompts": len(sampled), "sampled_tokens": args.sampled_tokens,
        "seed": args.seed, "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
