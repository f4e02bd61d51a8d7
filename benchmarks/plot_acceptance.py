"""One picture of drafter acceptance: mean tokens per step by beam shape, drafter alone and with the
context-lookup beam, from `mlx-redrafter eval-drafter` results (acceptance.json files).

    python benchmarks/plot_acceptance.py results/cpu/drafters/grid-round19/acceptance.json \
        --default 4x4:CPU --default 16x8:GPU --target 3.0 --out results/acceptance-default-drafter.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(files):
    """{(W, Lb): {lookup: tokens_per_step}} and the prompt counts seen, from eval-drafter JSON files."""
    rows, prompts = {}, set()
    for f in files:
        for r in json.loads(Path(f).read_text()):
            rows.setdefault((r["width"], r["length"]), {})[bool(r.get("lookup"))] = r["tokens_per_step"]
            prompts.add(r.get("prompts"))
    return rows, prompts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--extra", action="append", default=[], help="WxL:alone:lookup, a point measured elsewhere")
    p.add_argument("--default", action="append", default=[], help="WxL:device, a device's default shape (labelled)")
    p.add_argument("--target", type=float, default=3.5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows, prompts = load_rows(args.files)
    for item in args.extra:
        shape, alone, lookup = item.split(":")
        w, lb = map(int, shape.split("x"))
        rows[(w, lb)] = {False: float(alone), True: float(lookup)}
    shapes = sorted(rows, key=lambda s: (s[0] * s[1], s))
    x = range(len(shapes))
    fig, ax = plt.subplots(figsize=(1.1 * len(shapes) + 2.5, 3.6))
    for offset, lookup, label in ((-0.2, False, "drafter alone"), (0.2, True, "drafter + context lookup")):
        values = [rows[s].get(lookup, float("nan")) for s in shapes]
        bars = ax.bar([i + offset for i in x], values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(args.target, color="k", linestyle="--", linewidth=1, label=f"target {args.target}")
    defaults = dict(item.split(":") for item in args.default)
    ax.set_xticks(list(x), [f"{w} x {lb}" + (f"\n{defaults[f'{w}x{lb}']} default" if f"{w}x{lb}" in defaults else "")
                            for w, lb in shapes], fontsize=8)
    ax.set_xlabel("beam width W x beam length Lb")
    ax.set_ylabel("mean tokens per step")
    count = f"{prompts.pop()} " if len(prompts) == 1 and None not in prompts else ""
    ax.set_title(f"Default drafter on {count}MT-Bench first turns (greedy)")
    top = max([args.target] + [v for r in rows.values() for v in r.values() if v == v])  # NaN-free
    ax.set_ylim(0, top * 1.15)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
