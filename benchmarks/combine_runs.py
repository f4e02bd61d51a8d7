"""Pool the per-prompt results of several `tree_modes.py` files (one benchmark run split over device
calls) into medians and interquartile ranges of the per-prompt ratios to mlx-lm plain, and a
speculative step's time in plain tokens per prompt: (plain tokens/s / speculative tokens/s) x tokens per step.

    python benchmarks/combine_runs.py results/gpu/h200-qkv-rope/mt-bench-*.json
"""

import argparse
import json

import numpy as np

PLAIN = "mlx-lm plain"


def pooled(files):
    """{setting: [per-prompt dict with the prompt's plain tokens/s added]} over all files, in order."""
    rows = {}
    for f in files:
        per_prompt = json.load(open(f))["per_prompt"]
        for name, runs in per_prompt.items():
            assert len(runs) == len(per_prompt[PLAIN]), f"{f}: {name} has {len(runs)} prompts, plain {len(per_prompt[PLAIN])}"
            rows.setdefault(name, []).extend(dict(r, plain_tps=p["tps"]) for r, p in zip(runs, per_prompt[PLAIN]))
    return rows


def summary(runs) -> dict:
    ratio = np.array([r["tps"] / r["plain_tps"] for r in runs])
    out = {"prompts": len(runs), "speedup": float(np.median(ratio)),
           "speedup_q1_q3": [float(q) for q in np.percentile(ratio, [25, 75])],
           "identical": sum(bool(r.get("same")) for r in runs)}
    if all(r.get("steps") for r in runs):
        per_step = np.array([r["tokens"] / r["steps"] for r in runs])
        step = per_step / ratio  # a step's time in plain tokens
        total = sum(r["tokens"] for r in runs) / sum(r["steps"] for r in runs)
        out.update(tokens_per_step=float(total), step_in_plain_tokens=float(np.median(step)),
                   step_q1_q3=[float(q) for q in np.percentile(step, [25, 75])])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    for name, runs in pooled(args.files).items():
        s = summary(runs)
        step = (f"  step {s['step_in_plain_tokens']:.2f} ({s['step_q1_q3'][0]:.2f}-{s['step_q1_q3'][1]:.2f}) plain tokens,"
                f" {s['tokens_per_step']:.2f} tok/step" if "tokens_per_step" in s else "")
        print(f"{name:28s} {s['prompts']:3d} prompts  {s['speedup']:.2f}x ({s['speedup_q1_q3'][0]:.2f}-"
              f"{s['speedup_q1_q3'][1]:.2f})" + ("" if "T=" in name else f"  identical {s['identical']}/{s['prompts']}") + step)


if __name__ == "__main__":
    main()
