"""Draft settings chosen by measurement on this machine, for this model and drafter: `mlx-redrafter tune`.

What a step costs depends on the machine (a GPU verifies 38 tree tokens for
about two plain tokens, a 2-core CPU pays for every one) and what it yields
on the drafter, so no fixed default is right everywhere. `tune` decodes four
short prompts with plain decoding and with each candidate setting,
warmed up, interleaved and repeated for a time budget, keeps the fastest setting for greedy decoding and
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
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
    # 32x6:64 and 16x4:16 went (1.35x against 1.55-1.72x on the H200), then 32x6:32+12 and 32x8:48 (never picked in
    # four interleaved H200 runs, and 32x6:32+12 the slowest of five in all four: h200-rows-matmul/, h200-qkv-rope/tune-*); each shape's kernels are built on a
    # GPU's first run, and fewer settings measure more rounds in the same time. 32x6:32 gave way to 32x6:56: 3-5% faster
    # sampled in both halves of MT-Bench on an H100 and no slower greedy (benchmarks/tree_modes.py: there the fastest
    # sampled, 16x8:56 the fastest greedy)
    "gpu": [(16, 8, 56), (32, 6, 56), (16, 6, 24), (64, 6, 48)],
    # 4x4 verifying every node and 4x5 @ 0.1 went: never picked in eight CPU runs (1.31x-1.44x against 1.48x-1.61x
    # for 4x4 @ 0.1 / 0.2), and each costs a slow CPU ~7 s of `tune`'s minute
    "cpu": [(4, 4, 0, 0, 0.1), (4, 4, 0, 0, 0.2)],
}
PROMPTS = [
    "Write a short, friendly email inviting a colleague to lunch on Friday.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain to a ten-year-old why the sky is blue.",
    "A train leaves at 3 pm at 60 km/h. How far has it gone by 5:30 pm? Show your steps.",
]
MIN_GAIN = 1.03  # a setting must beat plain decoding by this much to be used
MIN_ROUNDS = 2  # rounds (prompts) per phase however short the budget (a CPU round takes ~8-13 s)


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
        """Raises ValueError, KeyError or TypeError on anything but what `to_json` writes."""
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


_SAID_DAMAGED = set()  # settings files already named as damaged in this process


def load_tuned(model, drafter) -> Optional[Tuned]:
    """The stored choice for this machine, model and drafter, or None: none stored, or a damaged file
    (named once per process on stderr: the built-in settings are used until `tune` runs again)."""
    path = settings_path(model, drafter)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return _damaged(path, getattr(e, "strerror", None) or "not text")
    try:
        return Tuned.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        return _damaged(path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)


def _damaged(path: Path, why: str) -> None:
    if path not in _SAID_DAMAGED:
        _SAID_DAMAGED.add(path)
        print(f"note: ignoring the tuned settings in {path} ({why}); built-in settings in use until "
              "`mlx-redrafter tune` measures them again", file=sys.stderr)
    return None


def writable_settings_path(model, drafter) -> Path:
    """`settings_path`, its folder made; ValueError saying what to do when it cannot be written
    (the CLI asks before measuring, so a bad cache folder costs no measuring time)."""
    path = settings_path(model, drafter)
    fix = "set MLX_REDRAFTER_HOME to a writable folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot store the result in {path.parent} ({e.strerror}): {fix}") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot store the result in {path.parent} (not writable): {fix}")
    if path.is_symlink() or (path.exists() and not path.is_file()):  # not a file tune wrote: never replaced
        raise ValueError(f"cannot store the result as {path}: something other than a settings file is there; "
                         f"remove it or {fix}")
    return path


def save_tuned(model, drafter, tuned: Tuned) -> Path:
    from .outputs import write_file

    path = writable_settings_path(model, drafter)
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
         seconds: float = 30.0, progress: bool = True) -> Tuned:
    """Measure plain decoding and each candidate (W, Lb, nodes[, lookup length[, min_prob]]) greedy, then the
    `finalists` fastest sampled at `temp`; return the fastest of each (None where plain decoding wins).

    Each phase is interleaved (a round decodes one prompt with every setting in turn, the order rotated each
    round, the prompts taken in turn) and repeated within its share of `seconds` (greedy 60%, sampled 40%; a
    round starts only if it should end within the share, but at least MIN_ROUNDS run), so a drifting machine
    shifts all settings alike, a fast one measures more rounds and prompts, and a slow one is not kept long.
    On the CPU the sampled phase leaves plain decoding out and compares with its greedy speed, as `benchmark`
    does (a plain token is the same forward either way): that saves a slow machine a plain run per round, at
    the price of plain drifting between the phases. A GPU round is cheap, so there plain runs in both."""
    from .generate import encode_prompts

    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
    candidates = candidates or CANDIDATES["gpu" if backend.on_gpu() else "cpu"]
    finalists = max(1, min(finalists, len(candidates)))
    shapes = [BeamShape(w, lb, True, n, **dict(zip(("lookup_length", "min_prob"), rest))) for w, lb, n, *rest in candidates]
    ids = encode_prompts(model, tokenizer, prompts, max_tokens)
    greedy, sampled = SamplingConfig(), SamplingConfig(temperature=temp, seed=0)
    measure = lambda group, sampling, budget, desc: _interleaved(  # noqa: E731
        model, tokenizer, drafter, group, ids, max_tokens, sampling, budget, progress, desc)
    plain_g, *speeds = measure([None, *shapes], greedy, 0.6 * seconds, "tune greedy")
    ranked = sorted(range(len(shapes)), key=lambda i: -speeds[i])[:finalists]
    with_plain = backend.on_gpu()
    measured = measure(([None] if with_plain else []) + [shapes[i] for i in ranked], sampled, 0.4 * seconds, "tune sampled")
    plain_s, best = (measured[0], measured[1:]) if with_plain else (plain_g, measured)
    sampled_speeds = dict(zip(ranked, best))
    rows = [{"setting": "plain", "greedy_tps": plain_g, "sampled_tps": plain_s if with_plain else None,
             "greedy_ratio": 1.0, "sampled_ratio": 1.0 if with_plain else None}]
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


def _interleaved(model, tokenizer, drafter, shapes: Sequence[Optional[BeamShape]], ids, max_tokens: int,
                 sampling: SamplingConfig, seconds: float, progress: bool, desc: str) -> List[float]:
    """Tokens per second of each setting (None: plain decoding): one warm-up run each on the longest
    prompt (on a GPU as long as a measured run, building the shapes it meets; on the CPU only when greedy),
    then rounds while the next should end within `seconds` of
    decoding, judged by the rounds so far (at least MIN_ROUNDS, or one per prompt if fewer): round r
    decodes prompt r mod len(ids) with every setting in turn, starting from setting r mod len(shapes)."""
    from .generate import stream_generate

    def run(shape, prompt, n, seed=0):
        start, count = None, 0
        drawn = sampling if sampling.greedy else replace(sampling, seed=seed)  # each round its own draws
        for _ in stream_generate(model, tokenizer, prompt, drafter=drafter if shape else None, beam=shape,
                                 max_tokens=n, sampling=drawn):
            if start is None:
                start = time.perf_counter()  # after the prompt: generation speed only
            count += 1
        return count - 1, time.perf_counter() - start

    # On a GPU the warm-up is as long as a measured run: its cache (slack 256 slots, ~38 written a step) can
    # reach a second span and compact only after several steps, and a new shape builds kernels. On the CPU
    # a new shape is only a trace (~40 ms of a ~2 s run), and a short warm-up keeps `tune` near a minute; the
    # sampled phase is not warmed there (its decoders trace again in their first run, which costs speculation
    # ~1%, where a warm-up would cost ~1.3 s a setting).
    gpu = backend.on_gpu()
    longest, warm = max(ids, key=len), max_tokens if gpu else min(8, max_tokens)
    warmed = shapes if gpu or sampling.greedy else []
    for shape in progress_bar(warmed, enabled=progress and bool(warmed), desc=f"{desc} (warm-up)", unit="setting",
                              leave=False):
        run(shape, longest, warm)
    tokens, spent = [0.0] * len(shapes), [0.0] * len(shapes)
    bar = progress_bar(total=max(round(seconds, 1), 0.1), enabled=progress, desc=desc, unit="s", leave=False,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s")
    clock, rounds, order = time.perf_counter(), 0, list(range(len(shapes)))
    while rounds < min(MIN_ROUNDS, len(ids)) or (time.perf_counter() - clock) * (rounds + 1) / rounds < seconds:
        for i in order[rounds % len(order):] + order[:rounds % len(order)]:
            n, s = run(shapes[i], ids[rounds % len(ids)], max_tokens, rounds)
            tokens[i], spent[i] = tokens[i] + n, spent[i] + s
        rounds += 1
        elapsed = time.perf_counter() - clock
        planned = elapsed / rounds * min(MIN_ROUNDS, len(ids))  # the compulsory rounds may outlast the budget
        if planned > bar.total:
            bar.reset(total=round(planned, 1))
        bar.update(min(elapsed, bar.total) - bar.n)
        bar.refresh()  # at once: a round takes seconds, and a reset bar would show 0 until the next
    bar.close()
    return [max(t, 1.0) / max(s, 1e-9) for t, s in zip(tokens, spent)]  # an answer that ends at once still gets a speed


def format_table(tuned: Tuned) -> str:
    lines = [f"{'setting':14s} {'greedy tok/s':>12s} {'vs plain':>9s} {'T>0 tok/s':>10s} {'vs plain':>9s}"]
    for r in tuned.rows:
        sampled = "" if r["sampled_tps"] is None else f"{r['sampled_tps']:10.1f} {r['sampled_ratio']:8.2f}x"
        lines.append(f"{r['setting']:14s} {r['greedy_tps']:12.1f} {r['greedy_ratio']:8.2f}x {sampled}")
    pick = lambda s: "plain decoding" if s is None else (  # noqa: E731
        f"{s.width} x {s.length}, {s.nodes or 'all'} nodes" + (f", lookup {s.lookup_length}" if s.lookup_length else "")
        + (f", nodes of p >= {s.min_prob:g}" if s.min_prob else ""))
    if tuned.rows[0]["sampled_tps"] is None and any(r["sampled_tps"] for r in tuned.rows):
        lines.append("(T>0 speeds are compared with plain greedy decoding)")
    lines.append(f"greedy: {pick(tuned.greedy)}; sampling: {pick(tuned.sampled)}")
    return "\n".join(lines)
