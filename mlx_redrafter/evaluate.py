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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .beam_search import BeamShape
from .decoding import Decoder, history_size
from .draft_tree import accept
from .distill import batch_generate
from .generate import encode_prompts, stream_generate
from .outputs import atomic_file, check_new_files, write_file
from .plots import grid
from .progress import progress as progress_bar
from .sampling import SamplingConfig


def acceptance(model, tokenizer, drafter, prompts: Sequence[str], shape: BeamShape, max_tokens: int = 128,
               progress: bool = True, sampling: SamplingConfig = SamplingConfig()) -> Dict:
    """Speculative decoding over prompts (greedy, or `sampling`); counts accepted drafted tokens per step."""
    accepted: List[int] = []
    tokens = 0
    ids = encode_prompts(model, tokenizer, prompts, max_tokens)
    for prompt in progress_bar(ids, progress, desc=f"W={shape.width} Lb={shape.length}", leave=False):
        for r in stream_generate(model, tokenizer, prompt, drafter=drafter,
                                 max_tokens=max_tokens, beam=shape, sampling=sampling):
            tokens += 1
            if not r.from_draft:
                accepted.append(r.step_accepted)
    return summary(shape, len(prompts), tokens, accepted, 0.0 if sampling.greedy else sampling.temperature)


def greedy_references(model, tokenizer, prompts: Sequence[str], max_tokens: int, batch_size: int = 16,
                      progress: bool = True) -> List[tuple]:
    """(prompt ids, greedy continuation up to EOS or max_tokens) per prompt, generated in batches."""
    ids = encode_prompts(model, tokenizer, prompts, max_tokens)
    eos, refs = set(tokenizer.eos_token_ids), []
    for i in progress_bar(range(0, len(ids), batch_size), progress, desc="greedy references", leave=False):
        refs += batch_generate(model, ids[i: i + batch_size], max_tokens, SamplingConfig(), eos)
    return list(zip(ids, refs))


def replay_acceptance(model, drafter, references: Sequence[tuple], shape: BeamShape, progress: bool = True) -> Dict:
    """Accepted tokens per step along greedy references (module docstring); same result as `acceptance`."""
    accepted = [a for _, _, a in replay_steps(model, drafter, references, shape, progress)]
    return summary(shape, len(references), sum(len(r) for _, r in references), accepted)


def replay_steps(model, drafter, references: Sequence[tuple], shape: BeamShape, progress: bool = True):
    """Yield (reference index k, position j, accepted a) for each replayed step: the step commits
    reference[j] (the base model's token) and the next a reference tokens, drafted.

    Each step builds the decoder's own tree, cut as `Decoder.draft` cuts it (`min_prob`), and applies its
    acceptance rule (`draft_tree.accept`) with the reference as the base model's choice at every node on it.
    """
    decoder = Decoder(model, drafter, shape, SamplingConfig())
    for k, (prompt, reference) in enumerate(progress_bar(references, progress, desc=f"W={shape.width} Lb={shape.length}",
                                                         leave=False)):
        context = list(prompt) + list(reference)
        hidden = drafter.base_features(model, mx.array([context]))[1][0]
        # padded to the live decoder's history buckets: a compiled tree graph is built per shape
        history = mx.array([context + [-1] * (history_size(len(context) + shape.emit_length) - len(context))])
        j = 0
        while j < len(reference):
            at = len(prompt) + j  # reference[j] is this step's g0
            tree = decoder.cut(decoder.tree(hidden[at - 1][None], mx.array([reference[j]]), history, mx.array([at])))
            L = shape.emit_length
            truth = mx.array([(context[at + 1: at + L] + [-1] * L)[:L]])
            a = int(accept(tree, mx.take_along_axis(truth, tree.depth, axis=1)).count[0])
            yield k, j, a
            j += a + 1


def summary(shape: BeamShape, prompts: int, tokens: int, accepted: List[int], temperature: float = 0.0) -> Dict:
    counts = np.bincount(accepted, minlength=shape.emit_length)
    steps = max(len(accepted), 1)
    return {
        "width": shape.width, "length": shape.length, "lookup": shape.lookup, "nodes": shape.nodes, "tree": shape.tree,
        "lookup_length": shape.lookup_length if shape.lookup else 0,
        "lookup_beams": shape.lookup_beams, "min_prob": float(shape.min_prob),
        "prompts": prompts, "temperature": temperature,
        "steps": len(accepted), "tokens": tokens,
        "tokens_per_step": tokens / steps,
        # share of steps that accepted at least k drafted tokens, k = 1 .. emit length - 1
        "accept_at_least": [float(counts[k:].sum() / steps) for k in range(1, shape.emit_length)],
        "histogram": counts.tolist(),
    }


def acceptance_grid(model, tokenizer, drafter, prompts, widths, lengths, max_tokens=128, progress=True,
                    lookups=(False,), replay=True, nodes: int = 0, tree: str = "ranked",
                    sampling: SamplingConfig = SamplingConfig(), lookup_length: int = 0) -> List[Dict]:
    """`replay_acceptance` (or, with replay=False or a sampling temperature, `acceptance`) for every
    W x Lb x lookup setting."""
    shapes = [BeamShape(w, l, k, nodes, tree, lookup_length if k else 0) for k in lookups for w in widths for l in lengths]
    if not replay or not sampling.greedy:  # sampled output has no single reference to replay
        return [acceptance(model, tokenizer, drafter, prompts, s, max_tokens, progress, sampling) for s in shapes]
    references = greedy_references(model, tokenizer, prompts, max_tokens, progress=progress)
    return [replay_acceptance(model, drafter, references, s, progress) for s in shapes]


def markdown_table(results: List[Dict]) -> str:
    lines = ["| W | Lb | lookup | T | tokens/step | accepted >= k (k = 1, 2, ...) |", "|---|---|---|---|---|---|"]
    for r in results:
        ks = " ".join(f"{a:.2f}" for a in r["accept_at_least"])
        lookup = ("yes" if r.get("lookup") else "no") + (f" ({r['lookup_length']})" if r.get("lookup_length") else "")
        t = f"{r.get('temperature') or 0:g}"
        lines.append(f"| {r['width']} | {r['length']} | {lookup} | {t} | {r['tokens_per_step']:.2f} | {ks} |")
    return "\n".join(lines)


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
        grid(results, tmp, title)
    return Path(out_dir)


LOOKUPS = {"off": (False,), "on": (True,), "both": (False, True)}


def as_list(values) -> List[int]:
    """One integer or several, as a list."""
    return [values] if isinstance(values, int) else list(values)


def setting_label(row: Dict) -> str:
    """A result row's setting in a few characters: "4x4 +lookup", "32x6 32 nodes +lookup 12 x2" (two lookup beams),
    "4x4 +lookup @0.1" (drafted nodes below prefix probability 0.1 not verified)."""
    label = f"{row['width']}x{row['length']}"
    if row.get("nodes"):
        label += f" {row['nodes']} nodes"
    if row.get("tree") == "beams":
        label += " beams"
    label += " +lookup" if row.get("lookup") else ""
    label += f" {row['lookup_length']}" if row.get("lookup_length") else ""
    label += f" x{row['lookup_beams']}" if row.get("lookup_beams", 1) > 1 else ""
    label += f" @{row['min_prob']:g}" if row.get("min_prob") else ""
    return label + (f" T={row['temperature']:g}" if row.get("temperature") else "")


@dataclass
class EvalResult:
    """Accepted tokens per step for each setting `eval_drafter` tried (the table `mlx-redrafter
    eval-drafter` prints). Each row: width, length, lookup, nodes, tree, lookup_length, lookup_beams, min_prob,
    prompts, temperature, steps, tokens,
    tokens_per_step, accept_at_least (share of steps accepting >= k drafted tokens, k = 1 .. emit length - 1),
    histogram (steps by drafted tokens accepted).

    >>> ev = mr.eval_drafter(model, tokenizer, prompts=["Name three rivers."], widths=[4], lengths=[4])
    >>> ev.best["tokens_per_step"]
    >>> ev            # the table (Markdown in a notebook)
    >>> ev.plot()     # acceptance per drafted position, tokens per step per setting
    """

    rows: List[Dict]
    title: str
    replay: bool = True  # counted by replaying greedy references (False: by decoding)

    @property
    def best(self) -> Dict:
        return max(self.rows, key=lambda r: r["tokens_per_step"])

    def table(self) -> str:
        return markdown_table(self.rows)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        best = self.best
        return (f"<EvalResult {self.title}: {len(self.rows)} settings, best {best['tokens_per_step']:.2f} "
                f"at {setting_label(best)}; print() it for the table>")

    def _repr_markdown_(self) -> str:
        return f"**{self.title}**\n\n{self.table()}"

    def plot(self):
        """Share of steps whose k-th drafted token was accepted, per setting, and tokens per step: a Figure."""
        from .plots import figure, per_position

        fig, (positions, steps) = figure(2)
        labels = [setting_label(r) for r in self.rows]
        per_position(positions, {label: r["accept_at_least"] for label, r in zip(labels, self.rows)},
                     "share of steps accepting it", "acceptance per drafted position")
        steps.bar(labels, [r["tokens_per_step"] for r in self.rows])
        steps.set_ylabel("mean tokens per step")
        steps.set_title(self.title, fontsize="medium")
        steps.tick_params(axis="x", labelrotation=30)
        return fig

    def save(self, out, force: bool = False) -> Path:
        """acceptance.json, .md and .png in `out` (earlier ones replaced only with force)."""
        return save_results(self.rows, out, "acceptance", self.title, force)


def eval_drafter(model=None, tokenizer=None, drafter="auto", prompts=None, *, limit: Optional[int] = None,
                 every: int = 1, widths=(4, 32), lengths=(4, 8), lookup="both", nodes: int = 0, tree: str = "ranked",
                 lookup_length: int = 0, max_tokens: int = 256, decode: bool = False, temperature: float = 0.0, seed: int = 0, out=None,
                 force: bool = False, dtype="auto", progress: bool = True) -> EvalResult:
    """Mean accepted tokens per step (greedy, or sampled at `temperature`) over a grid of beam shapes: what `mlx-redrafter
    eval-drafter` runs.

    model, tokenizer: from `mr.load` (its `model.drafter` is evaluated), or a model path / id
        (None: the default model) loaded with `dtype`. drafter: "auto", a directory or a `Drafter`.
    prompts: a list of prompts, a prompt file, or None for MT-Bench's 80 first turns; every
        `every`-th, then the first `limit`.
    widths, lengths: beam widths W and lengths Lb to try; lookup: "off", "on" or "both" (or a
        bool) for the context-lookup beam; nodes, tree, lookup_length: as in `BeamShape`.
    decode: count by running speculative decoding instead of replaying greedy references
        (slower, the same counts). temperature > 0: count while sampling at that temperature
        (by decoding, each prompt seeded with `seed`). out: also write acceptance.json/.md/.png there.

    >>> model, tokenizer = mr.load()
    >>> ev = mr.eval_drafter(model, tokenizer, prompts=["Name three rivers.", "Write a haiku."],
    ...                      widths=[4], lengths=[4], max_tokens=64)
    >>> ev.plot()
    """
    from .data import prompt_texts
    from .loading import model_for

    lookups = (bool(lookup),) if isinstance(lookup, bool) else LOOKUPS.get(lookup)
    if lookups is None:
        raise ValueError(f"lookup (--lookup) must be off, on or both, got {lookup!r}")
    if lookup_length and lookups == (False,):
        raise ValueError("a lookup length (--lookup-length) needs the context-lookup beam: use --lookup on or both")
    widths, lengths = as_list(widths), as_list(lengths)
    if not widths or not lengths:
        raise ValueError(f"widths and lengths need one value each at least, got {widths} and {lengths}")
    for w in widths:  # bad shapes are refused before any work
        for length in lengths:
            BeamShape(w, length, nodes=nodes, tree=tree, lookup_length=lookup_length)
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    if out is not None:
        check_new_files(result_files(out, "acceptance"), force)  # before the (long) run
    base, tokenizer, draft = model_for(model, tokenizer, drafter, dtype)
    if draft is None:
        raise ValueError("no drafter given and none packaged for this model: pass --drafter (drafter=PATH)")
    texts = prompt_texts(prompts, limit, every)
    rows = acceptance_grid(base, tokenizer, draft, texts, widths, lengths, max_tokens, progress, lookups,
                           replay=not decode, nodes=nodes, tree=tree, sampling=sampling, lookup_length=lookup_length)
    name = Path(getattr(draft, "source", "drafter")).name
    result = EvalResult(rows, f"{name}: tokens per step ({len(texts)} prompts)", replay=not decode and sampling.greedy)
    if out is not None:
        result.save(out, force)
    return result
