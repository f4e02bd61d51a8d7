"""Draft settings chosen by measurement on this machine, for this model and drafter: `mlx-redrafter tune`.

What a step costs depends on the machine (a GPU verifies 38 tree tokens for
about two plain tokens, a 2-core CPU pays for every one) and what it yields
on the drafter, so no fixed default is right everywhere. `tune` decodes a few
short prompts with plain decoding and with each candidate setting,
interleaved and warmed up, keeps the fastest setting for greedy decoding and
for sampling (or plain decoding where nothing beats it), and stores the
choice in the user cache under a key of machine, model and drafter.
`generate` and the Python API then use it whenever no beam settings are
given:

    $ mlx-redrafter tune
    setting        greedy tok/s  vs plain
    plain                  16.1     1.00x
    ranked 4x4:0           20.4     1.27x   <- greedy
    ...
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from . import backend
from .beam_search import BeamShape
from .progress import progress as progress_bar
from .sampling import SamplingConfig

# (W, Lb, nodes[, lookup length[, min_prob]]) worth trying per device; the device default (beam_search.DEFAULT_SHAPE)
# is among them. A 12-token lookup beam accepted 15% more in replay (README, "Context lookup") but
# was slower end to end on the CPU; on a GPU, where a verified node costs little, tune decides.
CANDIDATES = {
    "gpu": [(32, 6, 32), (32, 6, 32, 12), (32, 8, 48), (16, 6, 24), (32, 6, 64), (64, 6, 48), (16, 4, 16)],
    "cpu": [(4, 4, 0, 0, 0.1), (4, 4, 0, 0, 0.2), (4, 4, 0), (4, 5, 0, 0, 0.1)],
}
PROMPTS = [
    "Write a short, friendly email inviting a colleague to lunch on Friday.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
]
MIN_GAIN = 1.03  # a setting must beat plain decoding by this much to be used


@dataclass
class Tuned:
    """The measured choice: `greedy` / `sampled` settings (None: plain decoding is faster)."""

    greedy: Optional[BeamShape]
    sampled: Optional[BeamShape]
    machine: str
    rows: List[dict] = field(default_factory=list)  # per setting: tokens/s greedy and sampled, ratio to plain

    def for_sampling(self, sampling: SamplingConfig) -> Optional[BeamShape]:
        return self.greedy if sampling.greedy else self.sampled

    def to_json(self) -> dict:
        shape = lambda s: None if s is None else asdict(s)  # noqa: E731
        return {"greedy": shape(self.greedy), "sampled": shape(self.sampled), "machine": self.machine, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "Tuned":
        shape = lambda d: None if d is None else BeamShape(**d)  # noqa: E731
        return cls(shape(data["greedy"]), shape(data["sampled"]), str(data["machine"]), list(data.get("rows", [])))


def fingerprint(module) -> str:
    """A short id of a model or drafter: its configuration, dtype and a few of its weights
    (computed each time, so a model changed in place gets a new id)."""
    config = getattr(module, "args", None) or getattr(module, "config", None)
    described = json.dumps(asdict(config) if config is not None else {}, sort_keys=True, default=str)
    leaves = [v for _, v in sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0])][:4]
    sums = [float(v.reshape(-1)[:4096].astype(mx.float32).sum()) for v in leaves]
    return hashlib.sha256(f"{described}|{[str(v.dtype) for v in leaves]}|{sums}".encode()).hexdigest()[:16]


def settings_path(model, drafter) -> Path:
    from .loading import home

    key = hashlib.sha256(f"{backend.machine()}|{fingerprint(model)}|{fingerprint(drafter)}".encode()).hexdigest()[:20]
    return home() / "tuned" / f"{key}.json"


def load_tuned(model, drafter) -> Optional[Tuned]:
    """The stored choice for this machine, model and drafter, or None (a damaged file counts as none)."""
    path = settings_path(model, drafter)
    try:
        return Tuned.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_tuned(model, drafter, tuned: Tuned) -> Path:
    from .outputs import write_file

    path = settings_path(model, drafter)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(tuned.to_json(), indent=2))
    return path


def first_use_notice(model, drafter) -> Optional[str]:
    """One line, the first time on this machine, saying that `tune` exists (None after that or once tuned)."""
    from .loading import home

    marker = home() / "tuned" / ".notice-shown"
    if marker.exists() or load_tuned(model, drafter) is not None:
        return None
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only cache: say it every time rather than never
    return ("note: built-in draft settings in use; `mlx-redrafter tune` measures the fastest ones "
            "for this machine, model and drafter (a minute or two)")


def tune(model, tokenizer, drafter, candidates: Optional[Sequence[Tuple[int, ...]]] = None,
         prompts: Sequence[str] = PROMPTS, max_tokens: int = 32, temp: float = 0.7, finalists: int = 2,
         progress: bool = True) -> Tuned:
    """Measure plain decoding and each candidate (W, Lb, nodes[, lookup length]), greedy, then the `finalists`
    fastest sampled at `temp`; return the fastest of each (None where plain decoding wins)."""
    from .generate import encode_prompt

    candidates = candidates or CANDIDATES["gpu" if backend.on_gpu() else "cpu"]
    finalists = max(1, min(finalists, len(candidates)))
    shapes = [BeamShape(w, lb, True, n, **dict(zip(("lookup_length", "min_prob"), rest))) for w, lb, n, *rest in candidates]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    greedy, sampled = SamplingConfig(), SamplingConfig(temperature=temp, seed=0)
    bar = progress_bar(total=(len(shapes) + 1 + finalists + 1) * (len(ids) + 1), enabled=progress, desc="tune", unit="run")
    plain_g = _speeds(model, tokenizer, drafter, None, ids, max_tokens, greedy, bar)
    speeds = [_speeds(model, tokenizer, drafter, s, ids, max_tokens, greedy, bar) for s in shapes]
    ranked = sorted(range(len(shapes)), key=lambda i: -speeds[i])[:finalists]
    plain_s = _speeds(model, tokenizer, drafter, None, ids, max_tokens, sampled, bar)
    sampled_speeds = {i: _speeds(model, tokenizer, drafter, shapes[i], ids, max_tokens, sampled, bar) for i in ranked}
    bar.close()
    rows = [{"setting": "plain", "greedy_tps": plain_g, "sampled_tps": plain_s, "greedy_ratio": 1.0, "sampled_ratio": 1.0}]
    for i, s in enumerate(shapes):
        rows.append({"setting": setting_name(s), "greedy_tps": speeds[i], "greedy_ratio": speeds[i] / plain_g,
                     "sampled_tps": sampled_speeds.get(i), "sampled_ratio": sampled_speeds[i] / plain_s if i in sampled_speeds else None})
    best_g = max(range(len(shapes)), key=lambda i: speeds[i])
    best_s = max(sampled_speeds, key=lambda i: sampled_speeds[i])
    return Tuned(shapes[best_g] if speeds[best_g] >= MIN_GAIN * plain_g else None,
                 shapes[best_s] if sampled_speeds[best_s] >= MIN_GAIN * plain_s else None, backend.machine(), rows)


def setting_name(shape: BeamShape) -> str:
    """W x Lb : nodes [+ lookup length] [@ min_prob], e.g. 32x6:32+12 or 4x4:0@0.1."""
    return (f"{shape.width}x{shape.length}:{shape.nodes}" + (f"+{shape.lookup_length}" if shape.lookup_length else "")
            + (f"@{shape.min_prob:g}" if shape.min_prob else ""))


def _speeds(model, tokenizer, drafter, shape, ids, max_tokens, sampling, bar) -> float:
    """Tokens per second over the prompts (after one warm-up run that builds the shapes)."""
    from .generate import stream_generate

    def run(prompt, n):
        start, count = None, 0
        for _ in stream_generate(model, tokenizer, prompt, drafter=drafter if shape else None, beam=shape,
                                 max_tokens=n, sampling=sampling):
            if start is None:
                start = time.perf_counter()  # after the prompt: generation speed only
            count += 1
        bar.update(1)
        return count - 1, time.perf_counter() - start

    run(ids[0], 16)
    tokens = seconds = 0.0
    for prompt in ids:
        n, s = run(prompt, max_tokens)
        tokens, seconds = tokens + n, seconds + s
    return max(tokens, 1.0) / max(seconds, 1e-9)  # an answer that ends at once still gets a speed


def format_table(tuned: Tuned) -> str:
    lines = [f"{'setting':14s} {'greedy tok/s':>12s} {'vs plain':>9s} {'T>0 tok/s':>10s} {'vs plain':>9s}"]
    for r in tuned.rows:
        sampled = "" if r["sampled_tps"] is None else f"{r['sampled_tps']:10.1f} {r['sampled_ratio']:8.2f}x"
        lines.append(f"{r['setting']:14s} {r['greedy_tps']:12.1f} {r['greedy_ratio']:8.2f}x {sampled}")
    pick = lambda s: "plain decoding" if s is None else (  # noqa: E731
        f"{s.width} x {s.length}, {s.nodes or 'all'} nodes" + (f", lookup {s.lookup_length}" if s.lookup_length else "")
        + (f", nodes of p >= {s.min_prob:g}" if s.min_prob else ""))
    lines.append(f"greedy: {pick(tuned.greedy)}; sampling: {pick(tuned.sampled)}")
    return "\n".join(lines)
