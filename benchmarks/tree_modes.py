"""Speed of the draft-tree settings side by side: mlx-lm plain against ReDrafter with Apple's
final-beams tree and with the confidence-ranked tree at several node budgets, interleaved
prompt by prompt, every setting warmed first, greedy (checked identical) and sampled.

    python benchmarks/tree_modes.py [--every 10] [--max-tokens 128] \
        [--settings beams:4x4,ranked:4x4:12,ranked:32x8:64] [--temp 0.7] [--out results/tree-modes.json]
        [--unfused-too]   (each setting also on the same weights with q/k/v and gate/up unfused)
        [--mlx-matmul-too]   (each setting also with MLX's own matmul for the projections, not
                              `cuda_matmul`'s few-row kernel; the same where that kernel is not used)
        [--other-drafter NAME=DIR]   (each setting also with a second drafter, interleaved)

A setting is `plain` (this package's own decoding without a drafter) or TREE:WxL[:NODES][+LOOKUP_LENGTH][*LOOKUP_BEAMS][@MIN_PROB] (NODES 0 or absent: every node of the beam search;
LOOKUP_LENGTH: tokens the context-lookup beam proposes, absent: L - 1; LOOKUP_BEAMS: how many lookup copies, absent: 1; MIN_PROB: drafted nodes the
drafter gives a lower prefix probability are not verified, `BeamShape.min_prob`).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)

import mlx.nn as nn
import numpy as np

from mlx_redrafter import find_drafter, load, load_drafter
from mlx_redrafter.speed import machine, run_mlx_lm, run_ours
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.data import prompt_texts
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.outputs import write_file
from mlx_redrafter.cuda_matmul import swap_linears
from mlx_redrafter.llama import Model, fuse_projections, mlx_lm_quantization, mlx_lm_weights, quantize_like
from mlx_redrafter.reference import to_mlx_lm
from mlx_redrafter.sampling import SamplingConfig


def parse_setting(text: str, lookup: bool) -> BeamShape:
    """TREE:WxLb[:NODES][+LOOKUP_LENGTH][*LOOKUP_BEAMS][@MIN_PROB], e.g. ranked:32x6:32+12, ranked:4x4@0.15
    or ranked:32x6:32+0*4 (four lookup beams of Lb - 1 tokens)."""
    text, _, min_prob = text.partition("@")
    text, _, beams = text.partition("*")
    text, _, lookup_length = text.partition("+")
    tree, shape, *nodes = text.split(":")
    w, length = (int(v) for v in shape.split("x"))
    return BeamShape(w, length, lookup, int(nodes[0]) if nodes else 0, tree, int(lookup_length or 0), float(min_prob or 0),
                     int(beams or 1))


def named_drafter(spec: str, model_path, model, option: str):
    """(NAME, drafter) from NAME=DIR (DIR 'auto': the model's packaged drafter); one-line errors."""
    name, _, path = spec.partition("=")
    if not name or not path:
        raise SystemExit(f"error: {option} takes NAME=DIR, got {spec!r}")
    path = find_drafter(model_path) if path == "auto" else str(Path(path).resolve())
    if path is None:
        raise SystemExit("error: no drafter is packaged for this model: pass NAME=DIR")
    return name, load_drafter(path, model)


def unfused_twin(model: Model) -> Model:
    """The same weights (shared arrays) in mlx-lm's layout: seven projection matmuls a layer."""
    twin = Model(model.args)
    quantize_like(twin, mlx_lm_quantization(model))
    twin.load_weights(list(mlx_lm_weights(model).items()), strict=True)
    return twin


def mlx_matmul_twins(model: Model, drafter):
    """Copies of the base weights, fused the same way, and the drafter reloaded, all on MLX's matmul
    (an --other-drafter keeps the kernel there)."""
    twin = unfused_twin(model)
    fuse_projections(twin)
    return swap_linears(twin, nn.Linear), swap_linears(load_drafter(drafter.source, twin), nn.Linear)


def summarize(runs: dict) -> dict:
    """Per setting: median tokens/s, median and IQR of the per-prompt ratio to mlx-lm plain, tokens per step,
    and (greedy) the share of outputs identical to mlx-lm's."""
    base = runs["mlx-lm plain"]
    rows = {}
    for name, rs in runs.items():
        ratios = [r["tps"] / b["tps"] for r, b in zip(rs, base)]
        row = {"median_tps": statistics.median(r["tps"] for r in rs), "speedup": statistics.median(ratios),
               "speedup_q1_q3": [float(q) for q in np.percentile(ratios, [25, 75])]}
        if rs[0]["steps"]:
            row["tokens_per_step"] = sum(len(r["tokens"]) for r in rs) / sum(r["steps"] for r in rs)
        if "T=" not in name:
            row["identical"] = sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base)) / len(rs)
        rows[name] = row
    return rows


def per_prompt(runs: dict) -> dict:
    """Per setting, each prompt's tokens/s, steps, tokens and whether they equal mlx-lm plain's (runs over
    parts of a prompt set can be pooled)."""
    base = runs["mlx-lm plain"]
    return {name: [{"tps": r["tps"], "steps": r["steps"], "tokens": len(r["tokens"]), "same": r["tokens"] == b["tokens"]}
                   for r, b in zip(rs, base)] for name, rs in runs.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--drafter")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--settings", default="beams:4x4,ranked:4x4:12")
    ap.add_argument("--no-lookup", action="store_true")
    ap.add_argument("--temp", type=float, default=0.7, help="also run each setting sampled (0: greedy only)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--other-drafter", metavar="NAME=DIR", help="each setting also with this drafter, interleaved")
    ap.add_argument("--unfused-too", action="store_true", help="each setting also with seven projection matmuls a layer")
    ap.add_argument("--mlx-matmul-too", action="store_true", help="each setting also with MLX's matmul for every projection")
    ap.add_argument("--out", type=Path, default=Path("results/tree-modes.json"))
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    try:
        shapes = {text: None if text == "plain" else parse_setting(text, not args.no_lookup) for text in args.settings.split(",")}
    except (ValueError, TypeError):
        raise SystemExit(f"error: --settings {args.settings!r}: each is plain or TREE:WxL[:NODES][+LOOKUP_LENGTH][*LOOKUP_BEAMS][@MIN_PROB], "
                         "e.g. ranked:32x6:32")

    model, tok, config = load(args.model, drafter="auto" if args.drafter is None else args.drafter, return_config=True, dtype=args.dtype)
    drafter = model.drafter
    if drafter is None:
        raise SystemExit("error: no drafter: pass --drafter")
    ids = [encode_prompt(tok, p) for p in prompt_texts(args.prompts, args.limit, args.every)]
    ref = to_mlx_lm(model, config)
    fns = {"mlx-lm plain": lambda i: run_mlx_lm(ref, tok, i, args.max_tokens)}
    samplings = [("greedy", None)] + ([(f"T={args.temp}", SamplingConfig(temperature=args.temp, seed=0))] if args.temp else [])
    models = {"": (model, None)} | ({" unfused": (unfused_twin(model), None)} if args.unfused_too else {}) \
        | ({" mlx-matmul": mlx_matmul_twins(model, drafter)} if args.mlx_matmul_too else {})
    drafters = {"": drafter}
    if args.other_drafter:
        name, other = named_drafter(args.other_drafter, args.model, model, "--other-drafter")
        drafters[f" {name}"] = other
    for text, shape in shapes.items():
        for label, sampling in samplings:
            for suffix, (m, own_drafter) in models.items():
                for dname, d in drafters.items() if shape else [("", None)]:
                    d = own_drafter if own_drafter is not None and d is drafter and shape else d
                    fns[f"{text} {label}{suffix}{dname}"] = \
                        lambda i, s=shape, smp=sampling, m=m, d=d: run_ours(m, tok, i, args.max_tokens, d, s, smp)
    for fn in fns.values():
        fn(ids[0])
    header = {"machine": machine(), "max_tokens": args.max_tokens, "lookup": not args.no_lookup,
              "drafter": getattr(drafter, "source", "auto"), "other_drafter": args.other_drafter}
    runs = {name: [] for name in fns}
    for n, i in enumerate(ids):
        for name, fn in fns.items():
            runs[name].append(fn(i))
        print(f"prompt {n + 1}/{len(ids)}", flush=True)
        rows = summarize(runs)   # saved after every prompt: a run stopped early keeps what it measured
        write_file(args.out, json.dumps(header | {"prompts": n + 1, "of": len(ids), "time": time.strftime("%Y-%m-%d %H:%M"),
                                                  "rows": rows, "per_prompt": per_prompt(runs)}, indent=2))
    print(f"{'setting':28s} {'tok/s':>8s} {'vs mlx-lm':>10s} {'IQR':>13s} {'tok/step':>9s} identical")
    for name, r in rows.items():
        print(f"{name:28s} {r['median_tps']:8.1f} {r['speedup']:9.2f}x {r['speedup_q1_q3'][0]:5.2f}-{r['speedup_q1_q3'][1]:5.2f}  "
              f"{r.get('tokens_per_step', float('nan')):8.2f}  {r.get('identical', '')}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
