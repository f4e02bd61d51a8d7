"""Drafter evaluation: accepted tokens per step on held-out prompts, over a grid of W x Lb.

Two ways to count, equal in exact arithmetic:

- `acceptance` runs greedy speculative decoding itself (a base-model verify per step);
- `replay_acceptance` generates each prompt's greedy reference once, takes the
  base model's hidden states along it in one pass, then replays the steps:
  at each one the drafter beam-searches from the hidden state of the last
  committed token, the beam with the longest prefix equal to the reference is
  accepted, and the walk jumps ahead. Verification is what makes greedy
  decoding lossless, so the reference is exactly what decoding would emit and
  the counts are the same (tested in fp32), for a fraction of the cost: a grid
  of W x Lb costs one reference pass plus drafter steps.
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .beam_search import BeamShape
from .decoding import Decoder
from .draft_tree import accept
from .distill import batch_generate
from .generate import encode_prompt, stream_generate
from .outputs import atomic_file, check_new_files, write_file
from .sampling import SamplingConfig


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
    return summary(shape, len(prompts), tokens, accepted)


def greedy_references(model, tokenizer, prompts: Sequence[str], max_tokens: int, batch_size: int = 16,
                      progress: bool = True) -> List[tuple]:
    """(prompt ids, greedy continuation up to EOS or max_tokens) per prompt, generated in batches."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    eos, refs = set(tokenizer.eos_token_ids), []
    for i in tqdm(range(0, len(ids), batch_size), desc="greedy references", disable=not progress, leave=False):
        refs += batch_generate(model, ids[i: i + batch_size], max_tokens, SamplingConfig(), eos)
    return list(zip(ids, refs))


def replay_acceptance(model, drafter, references: Sequence[tuple], shape: BeamShape, progress: bool = True) -> Dict:
    """Accepted tokens per step along greedy references (module docstring); same result as `acceptance`.

    Each step builds the decoder's own tree and applies its acceptance rule (`draft_tree.accept`)
    with the reference as the base model's choice at every node on it.
    """
    decoder = Decoder(model, drafter, shape, SamplingConfig())
    accepted: List[int] = []
    tokens = 0
    for prompt, reference in tqdm(references, desc=f"W={shape.width} Lb={shape.length}", disable=not progress, leave=False):
        context = list(prompt) + list(reference)
        hidden = model(mx.array([context]))[0]
        history = mx.array([context + [-1] * shape.length])
        j = 0
        while j < len(reference):
            at = len(prompt) + j  # reference[j] is this step's g0
            tree = decoder.tree(hidden[at - 1][None], mx.array([reference[j]]), history, mx.array([at]))
            truth = mx.array([(context[at + 1: at + shape.length] + [-1] * shape.length)[: shape.length]])
            a = int(accept(tree, mx.take_along_axis(truth, tree.depth, axis=1)).count[0])
            accepted.append(a)
            j += a + 1
        tokens += len(reference)
    return summary(shape, len(references), tokens, accepted)


def summary(shape: BeamShape, prompts: int, tokens: int, accepted: List[int]) -> Dict:
    counts = np.bincount(accepted, minlength=shape.length)
    steps = max(len(accepted), 1)
    return {
        "width": shape.width, "length": shape.length, "lookup": shape.lookup, "nodes": shape.nodes, "tree": shape.tree,
        "prompts": prompts,
        "steps": len(accepted), "tokens": tokens,
        "tokens_per_step": tokens / steps,
        # share of steps that accepted at least k drafted tokens, k = 1 .. Lb-1
        "accept_at_least": [float(counts[k:].sum() / steps) for k in range(1, shape.length)],
        "histogram": counts.tolist(),
    }


def acceptance_grid(model, tokenizer, drafter, prompts, widths, lengths, max_tokens=128, progress=True,
                    lookups=(False,), replay=True, nodes: int = 0, tree: str = "ranked") -> List[Dict]:
    """`replay_acceptance` (or, with replay=False, `acceptance`) for every W x Lb x lookup setting."""
    shapes = [BeamShape(w, l, k, nodes, tree) for k in lookups for w in widths for l in lengths]
    if not replay:
        return [acceptance(model, tokenizer, drafter, prompts, s, max_tokens, progress) for s in shapes]
    references = greedy_references(model, tokenizer, prompts, max_tokens, progress=progress)
    return [replay_acceptance(model, drafter, references, s, progress) for s in shapes]


def markdown_table(results: List[Dict]) -> str:
    lines = ["| W | Lb | lookup | tokens/step | accepted >= k (k = 1..Lb-1) |", "|---|---|---|---|---|"]
    for r in results:
        ks = " ".join(f"{a:.2f}" for a in r["accept_at_least"])
        lookup = "yes" if r.get("lookup") else "no"
        lines.append(f"| {r['width']} | {r['length']} | {lookup} | {r['tokens_per_step']:.2f} | {ks} |")
    return "\n".join(lines)


def plot_grid(results: List[Dict], path, title: str, key: str = "tokens_per_step", label: str = "mean tokens per step"):
    """Heatmaps of `key` over W x Lb (one panel per lookup setting), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in results})
    lengths = sorted({r["length"] for r in results})
    panels = sorted({bool(r.get("lookup")) for r in results})
    grids = {p: np.full((len(widths), len(lengths)), np.nan) for p in panels}
    for r in results:
        grids[bool(r.get("lookup"))][widths.index(r["width"]), lengths.index(r["length"])] = r[key]
    every = np.stack(list(grids.values()))
    low, high = np.nanmin(every), np.nanmax(every)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * (1.2 * len(lengths) + 1.2) + 1, 0.8 * len(widths) + 1.8))
    for ax, panel in zip(axes[0], panels):
        grid = grids[panel]
        im = ax.imshow(grid, cmap="viridis", origin="lower", vmin=low, vmax=high)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(widths)), widths)
        ax.set_xlabel("beam length Lb (g0 included)")
        ax.set_ylabel("beam width W")
        for i in range(len(widths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w")
        if len(panels) > 1:
            ax.set_title("drafter + context lookup" if panel else "drafter alone")
    fig.colorbar(im, ax=axes[0].tolist(), label=label)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def result_files(out_dir, name: str) -> List[Path]:
    out = Path(out_dir)
    return [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]


def save_results(results: List[Dict], out_dir, name: str, title: str, force: bool = False):
    """NAME.json, .md and .png in out_dir; earlier result files are replaced only with force (each atomically)."""
    json_file, md_file, png_file = result_files(out_dir, name)
    check_new_files([json_file, md_file, png_file], force)
    write_file(json_file, json.dumps(results, indent=2))
    write_file(md_file, markdown_table(results) + "\n")
    with atomic_file(png_file) as tmp:
        plot_grid(results, tmp, title)
    return Path(out_dir)
