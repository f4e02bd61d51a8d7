"""The speculative decoding engine: explicit batch-shaped state and one `step` that stays on the device.

One token's trip, from `stream_generate` down:

1. `Decoder.prefill` runs the prompts (B rows, right-padded) and picks each
   row's first token g0 from the base model: the `DecodeState`.
2. `Decoder.step(state)` builds one lazy graph: the drafter's beam search from
   each row's hidden state (`beam_search.draft_levels`), the context-lookup
   proposal (`lookup.propose_on_device`), the verified tree of the `budget`
   most probable prefixes (`draft_tree.ranked_tree`), one base-model forward
   over the tree written at the cache's write pointer, a target token at every
   node on the accepted walk (`draft_tree.tree_targets`), the acceptance rule (`draft_tree.accept`),
   and the commit (`SlotCache.commit`: a mask update, no K/V copy). It returns
   the next state and `Emitted` (g0 plus the accepted tokens per row) without
   reading anything back.
3. `Decoder.run` enqueues step t + 1 (`mx.async_eval`) before it reads step t's
   tokens, so the host's Python overlaps the device's work.

Shapes depend only on (B, W, Lb, budget, lookup length) and the cache span (a multiple of
256), so a GPU builds its kernels once per span; with `BeamShape.min_prob` (the CPU default) the
host cuts the tree after the draft, and the verify's row count varies from step to step (the
compiled verify traces each new shape once, `Decoder._bound_traces`).
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import backend
from .beam_search import BeamShape, draft_levels
from .draft_tree import DraftTree, accept, ranked_tree, tree_targets, trim
from .generate import PREFILL_CHUNK
from .kv_cache import SlotCache, SlotView, device_span_step
from .lookup import propose_on_device
from .sampling import SamplingConfig, choose_tokens

HISTORY_STEP = 256
MAX_TRACES = 64  # compiled verify shapes kept per decoder (Decoder._bound_traces)


@dataclass
class DecodeState:
    """Where decoding stands, per row b of B.

    cache: K/V and which slots are committed (`SlotCache`, owns lengths (B,));
    g0 (B,): the base model's next token, not yet emitted; hidden (B, F): what the
    drafter reads of the base model's forward before it (its hidden state, F = H, for
    Apple's layout; `Drafter.base_features`); history (B, T): committed
    tokens (for context lookup), T a multiple of 256 beyond lengths + the emit length.
    """

    cache: SlotCache
    g0: mx.array
    hidden: mx.array
    history: mx.array


class Emitted(NamedTuple):
    """tokens (B, L) (L = `BeamShape.emit_length`): g0 then the accepted drafted tokens; count (B,): drafted tokens accepted
    (row b emits tokens[b, :count[b] + 1])."""

    tokens: mx.array
    count: mx.array


class Decoder:
    """Speculative decoding of B rows with a drafter: the engine under `stream_generate`; see the module docstring.

    >>> model, tokenizer = mr.load()
    >>> decoder = mr.Decoder(model, model.drafter, mr.default_shape(), mr.SamplingConfig())
    >>> steps = decoder.run([tokenizer.encode("Hi"), tokenizer.encode("Hello")])  # endless: stop it yourself
    >>> for _, (tokens, accepted) in zip(range(8), steps):
    ...     print(tokens[0], accepted[0])   # per step: row 0's new tokens, drafted tokens accepted
    """

    def __init__(self, model, drafter, shape: BeamShape, sampling: SamplingConfig, slack: Optional[int] = None,
                 compiled: Optional[bool] = None):
        self.model, self.drafter, self.shape, self.sampling = model, drafter, shape, sampling
        depth = shape.length - 1
        final_beams = shape.tree == "beams"
        self.budget = shape.width * depth if final_beams or not shape.nodes else min(shape.nodes, shape.width * depth)
        self.nodes = 1 + self.budget + shape.lookup_nodes
        self.span_step = device_span_step()
        self.slack = self.span_step if slack is None else slack
        # the weights are inputs, not constants of the trace: a model or drafter updated in place is seen
        self.tree = mx.compile(partial(_draft_tree, drafter, model, shape, self.budget, final_beams),
                               inputs=[drafter.state, model.state])
        """tree(hidden (B, F), g0 (B,), history (B, T), lengths (B,)) -> DraftTree, one compiled graph."""
        self._verify_fn = partial(_verify, drafter, model)  # the drafter only names the layers it reads
        self._compiled = compiled is not False
        self._traced = set()
        self._verify = mx.compile(self._verify_fn, inputs=[model.state]) if self._compiled else self._verify_fn
        # compiled by default: replaying a trace saves the host's graph building, which on the CPU with
        # `min_prob` the device waits for (the cut reads the draft first); one trace per (rows, span)
        """verify(tokens, positions, ancestors, valid, start, buffers) -> (features, logits, buffers)"""
        # MLX caches traces per function object: one per decoder. Draws on the walk only on the CPU
        # (draft_tree.tree_targets), at every node on a GPU.
        accept_fn = partial(_accept, sampling, not backend.on_gpu())
        self._accept = mx.compile(accept_fn, inputs=[mx.random.state], outputs=[mx.random.state])

    def make_cache(self) -> SlotCache:
        return SlotCache(len(self.model.layers), self.slack, self.span_step)

    def prefill(self, prompts: List[List[int]], cache: Optional[SlotCache] = None) -> DecodeState:
        """Run the prompts and pick g0. A `cache` holding the K/V of every prompt's first
        `cache.length` tokens (a reused prompt cache, `SlotCache.truncate`) is continued from there:
        only the rest is run. The prompts still count from their first token (lookup reads them)."""
        cache = cache or self.make_cache()
        done = cache.length
        if not prompts or min(len(p) for p in prompts) <= done:
            raise ValueError("the prompt is empty" if done == 0 else "the prompt must extend past the cached tokens")
        lengths = [len(p) for p in prompts]
        padded = np.zeros((len(prompts), max(lengths)), dtype=np.int32)
        for row, p in enumerate(prompts):
            padded[row, : len(p)] = p
        hidden, features = _prefill_rows(self.drafter, self.model, mx.array(padded[:, done:]),
                                         [n - done for n in lengths], cache)
        cache.start(lengths)
        g0 = choose_tokens(self.model.logits(hidden), self.sampling)
        history = mx.array(np.pad(padded, [(0, 0), (0, history_size(max(lengths) + self.shape.emit_length) - padded.shape[1])]))
        return DecodeState(cache, g0, features, history)

    def step(self, state: DecodeState) -> Tuple[DecodeState, Emitted]:
        """One speculative step for every row, as a lazy graph: draft, verify, commit."""
        tree = self.draft(state)
        hidden, logits = self.verify(state, tree)
        return self.commit(state, tree, hidden, logits)

    def draft(self, state: DecodeState) -> DraftTree:
        """Beam search, lookup proposal and the tree to verify (one compiled graph); with
        `BeamShape.min_prob`, cut to the nodes worth verifying (`draft_tree.trim`, a host sync)."""
        cache = state.cache
        cache.maybe_compact(self.nodes)
        state.history = _fit_history(state.history, cache.bound + 2 * self.shape.emit_length)
        return self.cut(self.tree(state.hidden, state.g0, state.history, cache.lengths))

    def cut(self, tree: DraftTree) -> DraftTree:
        """The tree without the drafted nodes below `BeamShape.min_prob` (`draft_tree.trim`; as it is without one)."""
        return trim(tree, self.budget, self.shape.min_prob) if self.shape.min_prob else tree

    def verify(self, state: DecodeState, tree: DraftTree) -> Tuple[mx.array, mx.array]:
        """One base-model forward over the tree: what the drafter reads (B, N, F) and logits (B, N, V)."""
        cache = state.cache
        view, valid = cache.reserve(tree.tokens.shape[1])
        self._bound_traces((tree.tokens.shape, valid.shape, cache.layers[0].keys.shape))
        hidden, logits, buffers = self._verify(tree.tokens, cache.lengths[:, None] + tree.depth,
                                               tree.ancestors, valid, view.start, view.state())
        cache.store(SlotView(buffers, view.start))
        return hidden, logits

    def _bound_traces(self, shapes: tuple) -> None:
        """A long context passes many spans (each trace ~5 MB on the CPU): past MAX_TRACES shapes
        the traces are dropped and rebuilt as needed."""
        if not self._compiled or shapes in self._traced:
            return
        if len(self._traced) >= MAX_TRACES:
            self._traced.clear()
            self._verify = mx.compile(self._verify_fn, inputs=[self.model.state])
        self._traced.add(shapes)

    def commit(self, state: DecodeState, tree: DraftTree, hidden, logits) -> Tuple[DecodeState, Emitted]:
        """The base model's tokens on the tree and the acceptance rule, then the accepted nodes become
        committed (a mask update) and the bonus token with its hidden state the next step's start."""
        result, keep, history = self._accept(tree, logits, state.history, state.cache.lengths)
        state.cache.commit(keep, result.count + 1, self.shape.emit_length)
        next_hidden = mx.take_along_axis(hidden, result.best[:, None, None], axis=1)[:, 0]
        return replace(state, g0=result.bonus, hidden=next_hidden, history=history), Emitted(result.tokens, result.count)

    def run(self, prompts: List[List[int]], cache: Optional[SlotCache] = None) -> Iterator[Tuple[List[List[int]], List[int]]]:
        """Yield per step (tokens emitted by each row, drafted tokens accepted per row), forever;
        the next step is already queued on the device when a step's tokens are read.

        cache: as in `prefill`. Whenever a step is yielded, its committed slots hold the prompt and
        every token yielded so far (and the queued step's), so a caller can keep it for reuse."""
        state = self.prefill(prompts, cache)
        lengths = np.array([len(p) for p in prompts])
        state, emitted = self.step(state)
        mx.async_eval(emitted)
        while True:
            state, queued = self.step(state)
            mx.async_eval(queued)
            tokens, counts = np.array(emitted.tokens), np.array(emitted.count)
            lengths += counts + 1
            state.cache.bound = int(lengths.max()) + self.shape.emit_length  # exact, plus the step in flight
            yield [row[: c + 1].tolist() for row, c in zip(tokens, counts)], counts.tolist()
            emitted = queued


def _draft_tree(drafter, model, shape: BeamShape, budget: int, final_beams: bool, hidden, g0, history, lengths):
    levels = draft_levels(drafter, model, hidden, g0, shape)
    if shape.lookup:
        proposal, found = propose_on_device(history, lengths, g0, shape.lookup_depth, beams=shape.lookup_beams)
    else:
        proposal, found = levels.tokens[:, :, 0], mx.zeros(g0.shape, mx.bool_)
    return ranked_tree(levels, g0, proposal, found, budget, final_beams)


def _verify(drafter, model, tokens, positions, ancestors, valid, start, buffers):
    """The tree forward written at slot `start` of the buffers (see `SlotView`), logits per node."""
    view = SlotView(buffers, start)
    hidden, features = drafter.base_features(model, tokens, view, positions, view.tree_mask(ancestors, valid))
    return features, model.logits(hidden), view.state()


def _accept(sampling, walk, tree, logits, history, lengths):
    """The base model's tokens, the acceptance rule, the committed slots and the history after it
    (one compiled graph)."""
    result = accept(tree, tree_targets(tree, logits, sampling, walk))
    Lb = result.path.shape[1]
    depth_ok = mx.arange(Lb)[None] <= result.count[:, None]
    nodes = mx.arange(tree.tokens.shape[1])
    keep = ((result.path[:, :, None] == nodes) & depth_ok[:, :, None]).any(axis=1)
    # write the emitted tokens after each row's history (slots past count are rewritten later)
    history = mx.put_along_axis(history, lengths[:, None] + mx.arange(Lb)[None], result.tokens, axis=1)
    return result, keep, history


def _prefill_rows(drafter, model, tokens: mx.array, lengths: List[int], cache) -> Tuple[mx.array, mx.array]:
    """Run right-padded prompts (B, P) in chunks; each row's hidden state (B, H) and drafter
    features (B, F) at its last token."""
    B, P = tokens.shape
    last = mx.array([n - 1 for n in lengths])
    features = None
    for start in range(0, P, PREFILL_CHUNK):
        f = drafter.base_features(model, tokens[:, start : start + PREFILL_CHUNK], cache)[1]
        inside = (last >= start) & (last < start + f.shape[1])
        at = mx.clip(last - start, 0, f.shape[1] - 1)
        row_last = mx.take_along_axis(f, at[:, None, None], axis=1)[:, 0]
        features = row_last if features is None else mx.where(inside[:, None], row_last, features)
        mx.eval(features, cache.state())
    return features[:, -model.args.hidden_size:], features  # features end with the hidden state


def history_size(needed: int) -> int:
    return -(-needed // HISTORY_STEP) * HISTORY_STEP


def _fit_history(history: mx.array, needed: int) -> mx.array:
    size = history_size(needed)
    if history.shape[1] >= size:
        return history
    return mx.pad(history, [(0, 0), (0, size - history.shape[1])])
