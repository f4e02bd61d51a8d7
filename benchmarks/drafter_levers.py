"""Drafters side by side: tokens per step of several drafters on the same prompts, greedy
(replayed along one set of greedy references shared by all) and sampled (decoded, seeded).

    python benchmarks/drafter_levers.py --drafter shipped=auto --drafter sampled=runs/x/drafter \\
        [--prompts mt_bench.jsonl] [--every 2] [--max-tokens 256] [--shapes 4x4,32x6:32] \\
        [--temp 0.7] [--sampled-every 4] [--sampled-shapes 4x4] [--sampled-drafters shipped,sampled] \\
        [--out results/drafter-levers.json]

A shape is WxL[:NODES][+LOOKUP_LENGTH][*LOOKUP_BEAMS][@MIN_PROB]; each is counted with and without the context-lookup beam
(greedy; without it the lookup length changes nothing, so such a shape is counted once) and with
it (sampled). Prints a Markdown table (drafters by settings) and saves every row as JSON.
"""

import argparse
from dataclasses import replace
import json
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

from mlx_redrafter import load
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.evaluate import acceptance, greedy_references, replay_acceptance, setting_label
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.outputs import write_file
from mlx_redrafter.speed import machine
from tree_modes import named_drafter, parse_setting  # benchmarks/: WxL[:NODES] settings, NAME=DIR drafters


def parse_shape(text: str, lookup: bool) -> BeamShape:
    return parse_setting(f"ranked:{text}", lookup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--drafter", action="append", required=True, help="NAME=DIR (DIR 'auto': the packaged one)")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--shapes", default="4x4,32x6:32")
    ap.add_argument("--temp", type=float, default=0.7, help="also count sampled (0: greedy only)")
    ap.add_argument("--sampled-every", type=int, default=4, help="sampled runs use every K-th prompt (they decode)")
    ap.add_argument("--sampled-tokens", type=int, default=128)
    ap.add_argument("--sampled-shapes", help="shapes counted sampled (default: --shapes)")
    ap.add_argument("--sampled-drafters", help="NAME,... counted sampled (default: all)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/drafter-levers.json"))
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    for text in [*args.shapes.split(","), *(args.sampled_shapes or "").split(",")]:
        try:
            text and parse_shape(text, True)  # a bad shape fails here, not after an hour of counting
        except ValueError:
            raise SystemExit(f"error: a shape is WxL[:NODES][+LOOKUP_LENGTH][*LOOKUP_BEAMS][@MIN_PROB] (e.g. 4x4, 32x6:32+12, 4x4*2, 4x4@0.1), got {text!r}") from None

    model, tokenizer = load(args.model, drafter=None, dtype=args.dtype)
    drafters = {}
    for spec in args.drafter:
        name, drafter = named_drafter(spec, args.model, model, "--drafter")
        if name in drafters:
            raise SystemExit(f"error: --drafter takes NAME=DIR with a new NAME each time, got {spec!r}")
        drafters[name] = drafter
    texts = prompt_texts(args.prompts, None, args.every)
    sampled = prompt_texts(args.prompts, None, args.sampled_every)
    sampled_drafters = args.sampled_drafters.split(",") if args.sampled_drafters else list(drafters)
    if set(sampled_drafters) - set(drafters):
        raise SystemExit(f"error: --sampled-drafters names {sorted(set(sampled_drafters) - set(drafters))}, not a --drafter")
    started = time.perf_counter()
    references = greedy_references(model, tokenizer, texts, args.max_tokens)
    rows = []
    for name, drafter in drafters.items():
        for lookup in (False, True):  # without lookup its length changes nothing: each shape once
            shapes = dict.fromkeys(replace(parse_shape(t, True), lookup=False, lookup_length=0, lookup_beams=1) if not lookup
                                   else parse_shape(t, True) for t in args.shapes.split(","))
            for shape in shapes:
                r = replay_acceptance(model, drafter, references, shape)
                rows.append({"drafter": name, **r})
                print(f"{name:>12} {setting_label(r):>22} greedy  {r['tokens_per_step']:.2f}", flush=True)
        if args.temp > 0 and name in sampled_drafters:
            for text in (args.sampled_shapes or args.shapes).split(","):
                r = acceptance(model, tokenizer, drafter, sampled, parse_shape(text, True), args.sampled_tokens,
                               sampling=SamplingConfig(temperature=args.temp, seed=0))
                rows.append({"drafter": name, **r})
                print(f"{name:>12} {setting_label(r):>22} sampled {r['tokens_per_step']:.2f}", flush=True)
    labels = list(dict.fromkeys(setting_label(r) for r in rows))
    table = ["| drafter | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name in drafters:
        cells = {setting_label(r): f"{r['tokens_per_step']:.2f}" for r in rows if r["drafter"] == name}
        table.append(f"| {name} | " + " | ".join(cells.get(label, "") for label in labels) + " |")
    print("\n".join(table))
    write_file(args.out, json.dumps({
        "machine": machine(), "prompts": len(texts), "every": args.every, "max_tokens": args.max_tokens,
        "sampled_every": args.sampled_every, "sampled_tokens": args.sampled_tokens,
        "drafters": {n: getattr(d, "source", "auto") for n, d in drafters.items()},
        "seconds": round(time.perf_counter() - started, 1), "rows": rows, "table": table}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
