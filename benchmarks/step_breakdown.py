"""Where a ReDrafter step's time goes, timed from outside the engine: the decoder's phases
(`Decoder.draft`, `verify`, `commit`) are called one by one and each is evaluated on its
own, next to the pipelined step (`Decoder.run`) and a plain token, in the same run.

    python benchmarks/step_breakdown.py [--drafter D] [--settings ranked:4x4:12,beams:4x4] [--limit 5] [--verify both]

Prints a table and saves results/step_breakdown-<device>.json (--out).
"""

import argparse
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx

from mlx_redrafter import backend, find_drafter, load, stream_generate
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.decoding import Decoder
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.outputs import write_file
from mlx_redrafter.sampling import SamplingConfig

PHASES = ("draft", "verify", "commit")


def phases(decoder: Decoder, prompt, max_tokens: int):
    """(seconds per phase, steps, tokens) with every phase evaluated on its own."""
    times = dict.fromkeys(PHASES, 0.0)
    state = decoder.prefill([prompt])
    mx.eval(state.hidden, state.g0)
    steps = tokens = 0
    while tokens < max_tokens:
        t0 = time.perf_counter()
        tree = decoder.draft(state)
        mx.eval(tree)
        t1 = time.perf_counter()
        hidden, logits = decoder.verify(state, tree)
        mx.eval(hidden, logits)
        t2 = time.perf_counter()
        state, emitted = decoder.commit(state, tree, hidden, logits)
        mx.eval(emitted, state.hidden, state.cache.valid, state.cache.lengths)
        t3 = time.perf_counter()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
            times[k] += dt
        steps += 1
        tokens += int(emitted.count[0]) + 1
        state.cache.bound = int(state.cache.lengths.max()) + decoder.shape.emit_length
    return times, steps, tokens


def pipelined(decoder: Decoder, prompt, max_tokens: int):
    """(seconds, steps, tokens) of the real loop."""
    start, steps, tokens = time.perf_counter(), 0, 0
    for emitted, _ in decoder.run([prompt]):
        steps += 1
        tokens += len(emitted[0])
        if tokens >= max_tokens:
            break
    return time.perf_counter() - start, steps, tokens


def plain_ms(model, tok, prompt, max_tokens: int) -> float:
    rs = list(stream_generate(model, tok, prompt, max_tokens=max_tokens, drafter=None))
    return 1000 / rs[-1].generation_tps


def profile(decoder, model, tok, prompts, max_tokens):
    totals, steps, tokens, loop_s, loop_steps, plain = dict.fromkeys(PHASES, 0.0), 0, 0, 0.0, 0, []
    for prompt in prompts:
        t, s, n = phases(decoder, prompt, max_tokens)
        totals = {k: totals[k] + t[k] for k in PHASES}
        steps, tokens = steps + s, tokens + n
        secs, s2, _ = pipelined(decoder, prompt, max_tokens)
        loop_s, loop_steps = loop_s + secs, loop_steps + s2
        plain.append(plain_ms(model, tok, prompt, max_tokens))
    per_step = {k: 1000 * v / steps for k, v in totals.items()}
    plain_token = sorted(plain)[len(plain) // 2]
    return {"tokens_per_step": tokens / steps, "ms_per_step": per_step, "sum_ms": sum(per_step.values()),
            "pipelined_ms_per_step": 1000 * loop_s / loop_steps, "plain_ms_per_token": plain_token,
            "step_in_plain_tokens": 1000 * loop_s / loop_steps / plain_token}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--drafter")
    p.add_argument("--prompts", type=Path)
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--settings", default="ranked:4x4:12,beams:4x4")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--verify", choices=["default", "compiled", "eager", "both"], default="default",
                   help="the tree forward as one mx.compile'd graph or built op by op (default: compiled)")
    p.add_argument("--out", type=Path, help="the JSON to write (default: results/step_breakdown-{cpu,gpu}.json)")
    args = p.parse_args()
    from tree_modes import parse_setting

    out = args.out or Path(f"results/step_breakdown-{'gpu' if backend.on_gpu() else 'cpu'}.json")
    if out.exists():
        raise SystemExit(f"error: {out} exists; pass another --out")
    path = find_drafter(args.model, args.drafter)
    if path is None:
        raise SystemExit("error: no drafter: pass --drafter")
    model, tok = load(args.model, drafter=path, dtype=args.dtype)
    drafter = model.drafter
    prompts = [encode_prompt(tok, t) for t in prompt_texts(args.prompts, args.limit, args.every)]
    sampling = SamplingConfig(temperature=args.temp, seed=0)
    rows = {}
    print(f"{'setting':>26} {'tok/step':>8} " + " ".join(f"{k:>8}" for k in PHASES)
          + f" {'sum':>8} {'pipelined':>9} {'plain':>6} {'step/plain':>10}  (ms)")
    modes = {"default": [None], "compiled": [True], "eager": [False], "both": [True, False]}[args.verify]
    for text, compiled in ((t, c) for t in args.settings.split(",") for c in modes):
        decoder = Decoder(model, drafter, parse_setting(text, True), sampling, compiled=compiled)
        text += {None: "", True: " compiled", False: " eager"}[compiled]
        profile(decoder, model, tok, prompts[:1], 32)  # warm this setting's shapes
        r = profile(decoder, model, tok, prompts, args.max_tokens)
        rows[text] = r
        ms = r["ms_per_step"]
        print(f"{text:>26} {r['tokens_per_step']:8.2f} " + " ".join(f"{ms[k]:8.2f}" for k in PHASES)
              + f" {r['sum_ms']:8.2f} {r['pipelined_ms_per_step']:9.2f} {r['plain_ms_per_token']:6.2f} {r['step_in_plain_tokens']:10.2f}")
    write_file(out, json.dumps({"temp": args.temp, "prompts": len(prompts), "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
