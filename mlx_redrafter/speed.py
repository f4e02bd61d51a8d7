"""Speed benchmark (`mr.benchmark`, `mlx-redrafter benchmark`): mlx-lm plain, this project's plain
decoder, ReDrafter greedy and sampled, and mlx-lm's draft-model speculative decoding, interleaved
prompt by prompt in one run, every method warmed up first."""

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

from . import backend
from .backend import machine
from .beam_search import BeamShape, default_shape
from .evaluate import as_list
from .generate import encode_prompts, stream_generate
from .outputs import atomic_file, check_new_files, write_file
from .plots import grid
from .progress import progress as progress_bar
from .reference import to_mlx_lm
from .sampling import SamplingConfig


def run_ours(model, tok, ids, max_tokens, drafter=None, shape=None, sampling=None):
    rs = list(stream_generate(model, tok, ids, drafter=drafter, beam=shape, max_tokens=max_tokens, sampling=sampling))
    return {"tokens": [r.token for r in rs], "tps": rs[-1].generation_tps, "steps": rs[-1].steps,
            "peak_gb": rs[-1].peak_memory}


def run_mlx_lm(ref, tok, ids, max_tokens, draft_model=None, num_draft_tokens=3):
    mx.reset_peak_memory()
    kwargs = {"draft_model": draft_model, "num_draft_tokens": num_draft_tokens} if draft_model is not None else {}
    rs = list(mlx_lm_stream_generate(ref, tok, mx.array(ids), max_tokens=max_tokens, **kwargs))
    return {"tokens": [r.token for r in rs], "tps": rs[-1].generation_tps, "steps": None,
            "peak_gb": mx.get_peak_memory() / 1e9}


def quantized_copy(ref, bits=4, group_size=64):
    """The draft model for mlx-lm's speculative decoding: a 4-bit copy of the base."""
    from copy import deepcopy

    draft = deepcopy(ref)
    nn.quantize(draft, group_size=group_size, bits=bits)
    mx.eval(draft.parameters())
    return draft


def methods(model, config, drafter, shape: BeamShape, temp: Optional[float], with_mlx_lm_spec: bool):
    ref = to_mlx_lm(model, config)
    m = {
        "mlx-lm plain": lambda tok, ids, n: run_mlx_lm(ref, tok, ids, n),
        "ours plain": lambda tok, ids, n: run_ours(model, tok, ids, n),
    }
    if drafter is not None:
        m["redrafter greedy"] = lambda tok, ids, n: run_ours(model, tok, ids, n, drafter, shape)
    if drafter is not None and temp is not None:
        sampled = SamplingConfig(temperature=temp, seed=0)
        m[f"redrafter T={temp}"] = lambda tok, ids, n: run_ours(model, tok, ids, n, drafter, shape, sampled)
    if with_mlx_lm_spec:
        draft = quantized_copy(ref)
        m["mlx-lm speculative (4-bit draft)"] = lambda tok, ids, n: run_mlx_lm(ref, tok, ids, n, draft)
    return m


def summarize(runs: Dict[str, List[dict]], greedy_reference: str = "mlx-lm plain") -> Dict[str, dict]:
    base = runs[greedy_reference]
    out = {}
    for name, rs in runs.items():
        tps = [r["tps"] for r in rs]
        ratios = [r["tps"] / b["tps"] for r, b in zip(rs, base)]
        q1, q3 = np.percentile(tps, [25, 75])
        row = {"median_tps": statistics.median(tps), "iqr_tps": [float(q1), float(q3)],
               "speedup_vs_mlx_lm": statistics.median(ratios), "peak_gb": max(r["peak_gb"] for r in rs)}
        steps = [r["steps"] for r in rs if r["steps"]]
        if steps and "redrafter" in name:
            row["tokens_per_step"] = sum(len(r["tokens"]) for r in rs) / sum(steps)
        if "T=" not in name:
            row["identical_to_mlx_lm"] = sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base)) / len(rs)
        out[name] = row
    return out


def run_benchmark(model, tokenizer, config, drafter, prompts: List[str], max_tokens: int, shape: BeamShape,
                  temp: Optional[float] = 0.7, with_mlx_lm_spec: bool = True, progress: bool = True) -> Dict:
    ids = encode_prompts(model, tokenizer, prompts, max_tokens)
    fns = methods(model, config, drafter, shape, temp, with_mlx_lm_spec)
    for fn in fns.values():  # warm up every shape (tree buckets included)
        fn(tokenizer, ids[0], max_tokens)
    runs = {name: [] for name in fns}
    for i in progress_bar(range(len(ids)), progress, desc="benchmark", unit="prompt"):
        for name, fn in fns.items():
            runs[name].append(fn(tokenizer, ids[i], max_tokens))
    return {"machine": machine(), "dtype": str(model.model.norm.weight.dtype), "max_tokens": max_tokens,
            "prompts": len(ids), "beam": [shape.width, shape.length], "lookup": shape.lookup,
            "lookup_length": shape.lookup_length, "lookup_beams": shape.lookup_beams, "min_prob": shape.min_prob, "time": time.strftime("%Y-%m-%d %H:%M"),
            "summary": summarize(runs),
            "per_prompt_tps": {k: [r["tps"] for r in v] for k, v in runs.items()}}


def run_sweep(model, tokenizer, config, drafter, prompts, max_tokens, widths, lengths, lookup=True,
              progress=True, lookup_length: int = 0, min_prob: float = 0.0) -> List[Dict]:
    """ReDrafter greedy speed over W x Lb, against mlx-lm plain measured in the same run."""
    ids = encode_prompts(model, tokenizer, prompts, max_tokens)
    ref = to_mlx_lm(model, config)
    shapes = [BeamShape(w, l, lookup, lookup_length=lookup_length, min_prob=min_prob) for w in widths for l in lengths]
    for s in shapes:
        run_ours(model, tokenizer, ids[0], max_tokens, drafter, s)
    run_mlx_lm(ref, tokenizer, ids[0], max_tokens)
    results = {s: [] for s in shapes}
    base = []
    for i in progress_bar(range(len(ids)), progress, desc="sweep", unit="prompt"):
        base.append(run_mlx_lm(ref, tokenizer, ids[i], max_tokens)["tps"])
        for s in shapes:
            results[s].append(run_ours(model, tokenizer, ids[i], max_tokens, drafter, s))
    rows = []
    for s, rs in results.items():
        rows.append({"width": s.width, "length": s.length,
                     "median_tps": statistics.median(r["tps"] for r in rs),
                     "speedup": statistics.median(r["tps"] / b for r, b in zip(rs, base)),
                     "tokens_per_step": sum(len(r["tokens"]) for r in rs) / sum(r["steps"] for r in rs)})
    return rows


def prefill_prompt(tokenizer, texts: List[str], n_tokens: int) -> List[int]:
    """n_tokens of plain text ids: the prompts joined (repeated as needed), with no chat template."""
    text = "\n\n".join(texts)
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("the prompts are empty: nothing to measure prefill on")
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def run_prefill(model, tokenizer, config, ids: List[int], rounds: int = 2) -> Dict:
    """Prompt tokens/s of this project's prefill and mlx-lm's on the same weights, each as its own
    generate reports it (prompt time: until the first token), warmed, interleaved, median of rounds."""
    ref = to_mlx_lm(model, config)
    fns = {
        "ours": lambda p: next(stream_generate(model, tokenizer, p, drafter=None, max_tokens=1)).prompt_tps,
        "mlx-lm": lambda p: next(mlx_lm_stream_generate(ref, tokenizer, mx.array(p), max_tokens=1)).prompt_tps,
    }
    for fn in fns.values():
        fn(ids[: min(len(ids), 600)])  # warm up: a full chunk and a partial one
    tps = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            tps[name].append(fn(ids))
    median = {name: statistics.median(v) for name, v in tps.items()}
    return {"tokens": len(ids), "rounds": rounds, "tps": tps, "median_tps": median,
            "ratio_vs_mlx_lm": median["ours"] / median["mlx-lm"]}


def prefill_line(prefill: Dict) -> str:
    m = prefill["median_tps"]
    return (f"Prefill of a {prefill['tokens']}-token prompt: ours {m['ours']:.0f} tokens/s, mlx-lm {m['mlx-lm']:.0f} "
            f"tokens/s ({prefill['ratio_vs_mlx_lm']:.2f}x, median of {prefill['rounds']})")


def markdown(result: Dict) -> str:
    lines = [f"Machine: {result['machine']}, dtype {result['dtype']}, {result['prompts']} prompts, "
             f"max {result['max_tokens']} tokens, beam W x Lb = {result['beam'][0]} x {result['beam'][1]}"
             + (" + context lookup" if result.get("lookup") else "")
             + (f" of {result['lookup_length']} tokens" if result.get("lookup_length") else "")
             + (f" x {result['lookup_beams']} beams" if result.get("lookup_beams", 1) > 1 else "")
             + (f", drafted nodes of probability >= {result['min_prob']} verified" if result.get("min_prob") else ""), "",
             "| method | tokens/s (median) | IQR | speedup vs mlx-lm | tokens/step | peak GB | identical to mlx-lm |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["summary"].items():
        ident = f"{100 * r['identical_to_mlx_lm']:.0f}%" if "identical_to_mlx_lm" in r else "n/a (sampled)"
        tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "1.00" if "plain" in name else "-"
        lines.append(f"| {name} | {r['median_tps']:.1f} | {r['iqr_tps'][0]:.1f}-{r['iqr_tps'][1]:.1f} | "
                     f"{r['speedup_vs_mlx_lm']:.2f}x | {tps} | {r['peak_gb']:.2f} | {ident} |")
    if result.get("prefill"):
        lines += ["", prefill_line(result["prefill"])]
    return "\n".join(lines)


def result_files(out_dir, tag: str, sweep: bool) -> List[Path]:
    out = Path(out_dir)
    return [out / f"speed-{tag}.json", out / f"speed-{tag}.md"] + ([out / f"speedup-{tag}.png"] if sweep else [])


def save(result: Dict, sweep: Optional[List[Dict]], out_dir, tag: str, force: bool = False) -> Path:
    """speed-TAG.json and .md (and speedup-TAG.png with a sweep); earlier files are replaced only with force."""
    files = result_files(out_dir, tag, bool(sweep))
    check_new_files(files, force)
    md = markdown(result)
    if sweep:
        best = max(sweep, key=lambda r: r["speedup"])
        md += "\n\nSweep (ReDrafter greedy vs mlx-lm plain, median per-prompt ratio):\n\n| W | Lb | tokens/s | speedup | tokens/step |\n|---|---|---|---|---|\n"
        md += "\n".join(f"| {r['width']} | {r['length']} | {r['median_tps']:.1f} | {r['speedup']:.2f}x | {r['tokens_per_step']:.2f} |" for r in sweep)
        md += f"\n\nBest: W={best['width']}, Lb={best['length']}: {best['speedup']:.2f}x\n"
        with atomic_file(files[2]) as tmp:
            grid(sweep, tmp, f"ReDrafter speedup over mlx-lm ({tag})", key="speedup",
                      label="speedup vs mlx-lm plain")
    write_file(files[0], json.dumps({**result, "sweep": sweep}, indent=2))
    write_file(files[1], md + "\n")
    return Path(out_dir)


def default_tag() -> str:
    return "gpu" if backend.on_gpu() else "cpu"


@dataclass
class BenchmarkResult:
    """What `benchmark` measured (the table `mlx-redrafter benchmark` prints). `summary` per method:
    median_tps, iqr_tps, speedup_vs_mlx_lm (median of per-prompt ratios), peak_gb,
    tokens_per_step (ReDrafter), identical_to_mlx_lm (greedy); `per_prompt_tps` per method.

    >>> b = mr.benchmark(model, tokenizer, prompts=["Name three rivers.", "Write a haiku."], max_tokens=64)
    >>> b.speedup()   # ReDrafter greedy against mlx-lm plain
    >>> b             # the table (Markdown in a notebook)
    >>> b.plot()      # tokens/s per prompt and method, speedup per method
    """

    machine: str
    dtype: str
    max_tokens: int
    prompts: int
    beam: List[int]
    lookup: bool
    time: str
    summary: Dict[str, dict]
    per_prompt_tps: Dict[str, List[float]]
    lookup_length: int = 0  # the context-lookup beam's length (0: Lb - 1)
    lookup_beams: int = 1  # `BeamShape.lookup_beams`
    min_prob: float = 0.0  # `BeamShape.min_prob`
    sweep: Optional[List[dict]] = None  # ReDrafter greedy over W x Lb: width, length, median_tps, speedup, tokens_per_step
    prefill: Optional[dict] = None  # a long prompt's prefill tokens/s, ours against mlx-lm's (`run_prefill`)

    def record(self) -> dict:
        """The run as `save` writes it (speed-TAG.json), without the sweep."""
        return {k: v for k, v in asdict(self).items() if k != "sweep"}

    def speedup(self, method: str = "redrafter greedy") -> float:
        """Median per-prompt speed of `method` over mlx-lm's plain decoding."""
        if method not in self.summary:
            raise KeyError(f"no method {method!r} in this benchmark: one of {', '.join(self.summary)}")
        return self.summary[method]["speedup_vs_mlx_lm"]

    def table(self) -> str:
        return markdown(self.record())

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        speeds = ", ".join(f"{name} {row['speedup_vs_mlx_lm']:.2f}x" for name, row in self.summary.items())
        return f"<BenchmarkResult {self.prompts} prompts, {self.max_tokens} tokens: {speeds}; print() it for the table>"

    def _repr_markdown_(self) -> str:
        return self.table()

    def plot(self):
        """Tokens per second for each prompt and method, and each method's speedup: a matplotlib Figure."""
        from .plots import bars, figure

        fig, (per_prompt, speedups) = figure(2)
        bars(per_prompt, [str(i + 1) for i in range(self.prompts)], self.per_prompt_tps, "tokens per second",
             "speed per prompt")
        per_prompt.set_xlabel("prompt")
        names = list(self.summary)
        speedups.barh(names, [self.summary[n]["speedup_vs_mlx_lm"] for n in names])
        speedups.axvline(1.0, color="k", lw=0.8)
        speedups.invert_yaxis()
        speedups.set_xlabel("speedup vs mlx-lm plain (median per prompt)")
        speedups.set_title(f"{self.max_tokens} tokens, W x Lb = {self.beam[0]} x {self.beam[1]}", fontsize="medium")
        return fig

    def save(self, out, tag: Optional[str] = None, force: bool = False) -> Path:
        """speed-TAG.json and .md (and speedup-TAG.png with a sweep) in `out`; TAG: cpu or gpu by default."""
        return save(self.record(), self.sweep, out, tag or default_tag(), force)


def benchmark(model=None, tokenizer=None, drafter="auto", prompts=None, *, limit: Optional[int] = None,
              every: int = 1, max_tokens: int = 128, beam: Optional[BeamShape] = None, temp: Optional[float] = 0.7,
              mlx_lm_speculative: bool = True, sweep_widths=None, sweep_lengths=(3, 4, 5, 6),
              sweep_limit: Optional[int] = None, out=None, tag: Optional[str] = None, force: bool = False,
              dtype="auto", progress: bool = True, prefill_tokens: int = 0) -> BenchmarkResult:
    """Speed of ReDrafter against plain decoding and mlx-lm, prompt by prompt (what `mlx-redrafter
    benchmark` runs): mlx-lm plain, this package's plain decoder, ReDrafter greedy and sampled at
    `temp` (None: skipped), and mlx-lm's speculative decoding with a 4-bit copy as its draft model
    (mlx_lm_speculative=False: skipped). Greedy outputs are compared with mlx-lm's.

    model, tokenizer, drafter: as in `eval_drafter`; without a drafter only plain decoders run.
    prompts: a list, a prompt file, or None for MT-Bench (every `every`-th, the first `limit`).
    beam: the `BeamShape` (default: `default_shape()`, the device's). sweep_widths: also time
    ReDrafter greedy over these widths x `sweep_lengths` (on the first `sweep_limit` prompts).
    out: also write speed-TAG.json/.md there. prefill_tokens: also time the prefill of a prompt this
    long (capped by the context window), ours against mlx-lm's.

    >>> model, tokenizer = mr.load()
    >>> b = mr.benchmark(model, tokenizer, prompts=["Name three rivers.", "Write a haiku."], max_tokens=64,
    ...                  mlx_lm_speculative=False)
    >>> b.plot()
    """
    from .data import prompt_texts
    from .loading import model_for

    sweep_grid = (as_list(sweep_widths), as_list(sweep_lengths)) if sweep_widths else None
    tag = tag or default_tag()
    if out is not None:
        check_new_files(result_files(out, tag, sweep_grid is not None), force)  # before any work
    base, tokenizer, draft = model_for(model, tokenizer, drafter, dtype)
    if draft is None:
        print("note: no drafter, so only the plain decoders are measured", file=sys.stderr)
    texts = prompt_texts(prompts, limit, every)
    config = getattr(base, "config", None) or {}
    beam = beam or default_shape()
    run = run_benchmark(base, tokenizer, config, draft, texts, max_tokens, beam, temp, mlx_lm_speculative, progress)
    sweep = None
    if sweep_grid is not None and draft is not None:
        sweep = run_sweep(base, tokenizer, config, draft, texts[: sweep_limit or len(texts)], max_tokens,
                          *sweep_grid, beam.lookup, progress, lookup_length=beam.lookup_length,
                          min_prob=beam.min_prob)
    prefill = None
    if prefill_tokens:
        from .generate import context_window

        n = min(prefill_tokens, (context_window(base) or prefill_tokens + 1) - 1)
        prefill = run_prefill(base, tokenizer, config, prefill_prompt(tokenizer, texts, n))
    result = BenchmarkResult(**run, sweep=sweep, prefill=prefill)
    if out is not None:
        result.save(out, tag, force)
    return result
