"""Tokens per step against distillation tokens (issue 15's data-size curve), from a
`benchmarks/drafter_levers.py` run: each drafter named in --series is one point at the data size
its config.json records; those named in --others are drawn as labelled single points.

    python benchmarks/plot_data_size.py results/cpu/drafters/levers-data-size.json \
        --series size-1m,size-3m,size-6m --out results/cpu/drafters/data-size.png
"""

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def data_tokens(source: str) -> float:
    """Millions of distillation tokens a drafter was trained on (its config.json)."""
    if source == "auto":
        from mlx_redrafter import find_drafter
        source = find_drafter(None)
    config = json.loads((Path(source) / "config.json").read_text())
    return config["training"]["data_tokens"] / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("levers", type=Path, help="a drafter_levers.py JSON")
    p.add_argument("--series", required=True, help="NAME,... the drafters that differ only in data size")
    p.add_argument("--others", default="", help="NAME,... more drafters drawn as single labelled points")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    run = json.loads(args.levers.read_text())
    names = args.series.split(",")
    greedy = [r for r in run["rows"] if not r.get("temperature")]
    settings = list(dict.fromkeys((r["width"], r["length"], r.get("nodes"), bool(r["lookup"])) for r in greedy))
    size = {n: data_tokens(run["drafters"][n]) for n in names + [o for o in args.others.split(",") if o]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in settings:
        w, lb, nodes, lookup = setting
        label = f"{w} x {lb}" + (f", {nodes} nodes" if nodes else "") + (" + lookup" if lookup else ", alone")
        value = {r["drafter"]: r["tokens_per_step"] for r in greedy
                 if (r["width"], r["length"], r.get("nodes"), bool(r["lookup"])) == setting}
        line, = ax.plot([size[n] for n in names], [value[n] for n in names], marker="o", label=label)
        for other in size.keys() - set(names):
            ax.plot(size[other], value[other], marker="*", markersize=11, color=line.get_color())
            ax.annotate(other, (size[other], value[other]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xticks(sorted(size.values()), [f"{v:.1f}" for v in sorted(size.values())])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("distillation tokens (millions, base model's replies)")
    ax.set_ylabel("mean tokens per step (greedy)")
    ax.set_title(f"Data size, MT-Bench {run['prompts']} prompts, {run['max_tokens']} tokens", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
