"""Drafter evaluation: accepted tokens per step on held-out prompts, over a grid of W x Lb."""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from tqdm import tqdm

from .beam_search import BeamShape
from .generate import encode_prompt, stream_generate


def acceptance(model, tokenizer, drafter, prompts: Sequence[str], shape: BeamShape, max_tokens: int = 128,
               progress: bool = True) -> Dict:
    """Greedy speculative decoding over prompts; counts accepted drafted tokens per step."""
    accepted: List[int] = []
    tokens = 0
    for prompt in tqdm(prompts, desc=f"W={shape.width} Lb={shape.length}", disable=not progress, leave=False):
        for r in stream_generate(model, tokenizer, encode_prompt(tokenizer, prompt), drafter=drafter,
                                 max_tokens=max_tokens, beam=shape):
            tokens += 1
            if not r.from_draft:
                accepted.append(r.step_accepted)
    counts = np.bincount(accepted, minlength=shape.length)
    steps = max(len(accepted), 1)
    return {
        "width": shape.width, "length": shape.length, "prompts": len(prompts), "steps": len(accepted), "tokens": tokens,
        "tokens_per_step": tokens / steps,
        # share of steps that accepted at least k drafted tokens, k = 1 .. Lb-1
        "accept_at_least": [float(counts[k:].sum() / steps) for k in range(1, shape.length)],
        "histogram": counts.tolist(),
    }


def acceptance_grid(model, tokenizer, drafter, prompts, widths, lengths, max_tokens=128, progress=True) -> List[Dict]:
    return [acceptance(model, tokenizer, drafter, prompts, BeamShape(w, l), max_tokens, progress)
            for w in widths for l in lengths]


def markdown_table(results: List[Dict]) -> str:
    lines = ["| W | Lb | tokens/step | accepted >= k (k = 1..Lb-1) |", "|---|---|---|---|"]
    for r in results:
        ks = " ".join(f"{a:.2f}" for a in r["accept_at_least"])
        lines.append(f"| {r['width']} | {r['length']} | {r['tokens_per_step']:.2f} | {ks} |")
    return "\n".join(lines)


def plot_grid(results: List[Dict], path, title: str, key: str = "tokens_per_step", label: str = "mean tokens per step"):
    """Heatmap of `key` over W x Lb, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in results})
    lengths = sorted({r["length"] for r in results})
    grid = np.full((len(widths), len(lengths)), np.nan)
    for r in results:
        grid[widths.index(r["width"]), lengths.index(r["length"])] = r[key]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.8 * len(widths) + 1.8))
    im = ax.imshow(grid, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(widths)), widths)
    ax.set_xlabel("beam length Lb (g0 included)")
    ax.set_ylabel("beam width W")
    for i in range(len(widths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_results(results: List[Dict], out_dir, name: str, title: str):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(markdown_table(results) + "\n")
    plot_grid(results, out / f"{name}.png", title)
    return out
