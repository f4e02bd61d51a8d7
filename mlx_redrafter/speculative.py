"""The ReDrafter decoding loop: draft, pack, verify, commit — one host sync per step.

Each step, on the device and in one lazy graph:

1. verify the packed tree of the previous step's beams in one base-model
   forward (tree attention, positions committed + depth);
2. pick a target token at every node (`choose_tokens`: argmax, or a sample
   from the base model's filtered distribution);
3. accept along each beam while the drafted token equals the target at its
   parent; keep the beam with the most accepted tokens (a);
4. gather that beam's K/V into the cache (fixed shape Lb);
5. the target after the accepted tokens is the next g0 (bonus token) and its
   hidden state drives the drafter's beam search for the next step.

Then one sync brings back a, the chosen beam and the next beams; the host
emits g0 plus a accepted tokens, adds the context-lookup beam (`lookup.py`;
`BeamShape.lookup`) and packs the next tree.

Why sampling stays exact: drawing one target y ~ p at every node and
accepting the child equal to y is the rule "try the distinct children x_i in
turn, accept with p(x_i) / (mass not yet rejected), else sample from the rest"
in distribution (each x_i is taken with probability p(x_i), any other token
with its own p). Each node's draw is independent and read only where the
walk reaches that node, so every emitted token is a fresh draw from the base
model's distribution given the tokens before it: plain sampling, exactly.
Greedy is the same walk with y = argmax.
"""

import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .beam_search import BeamShape, compiled_beam_search
from .generate import prefill
from .lookup import ContextLookup, with_lookup_beam
from .sampling import SamplingConfig, choose_tokens
from .tree_attention import build_tree, to_device

__all__ = ["BeamShape", "speculative_steps", "exact_acceptance"]


def exact_acceptance(beams, node_of, logits, draft_logprobs, sampling: SamplingConfig):
    """Lossless verification (module docstring).

    beams (W, Lb), node_of (W, Lb), logits (n_pad, V), draft_logprobs (W, Lb-1) unused.
    Returns (best beam (), accepted count (), bonus token ()).
    """
    targets = choose_tokens(logits, sampling)  # (n_pad,)
    match = beams[:, 1:] == targets[node_of[:, :-1]]
    accepted = mx.cumprod(match.astype(mx.int32), axis=1).sum(axis=1)
    best = mx.argmax(accepted)
    a = accepted[best]
    return best, a, targets[node_of[best, a]]


def speculative_steps(
    model,
    drafter,
    prompt: List[int],
    sampling: SamplingConfig,
    shape: BeamShape,
    acceptance: Callable = exact_acceptance,
    bucket: int = 8,
    profile: Optional[Dict[str, float]] = None,
) -> Iterator[Tuple[List[int], int]]:
    """Yield (tokens, accepted) per step: g0 plus the accepted drafted tokens.

    profile: if given, each phase is evaluated on its own and its seconds are
    added under "tree", "verify", "accept+commit", "draft" and "host" (this
    serializes the step, so use it to see proportions, not for end-to-end speed).
    """
    clock = _Clock(profile)
    cache = model.make_cache()
    hidden = prefill(model, prompt, cache)[0]
    g0 = choose_tokens(model.logits(hidden), sampling)
    draft = compiled_beam_search(drafter, model, shape)
    beams, draft_lp = draft(hidden, g0)
    lookup = ContextLookup(prompt) if shape.lookup else None
    beams_np = with_lookup_beam(np.array(beams), lookup)
    while True:
        clock.start()
        tree = build_tree(beams_np, bucket)
        start = cache.length
        inputs = to_device(tree, beams_np, start, cache.span_for(start + len(tree.tokens)))
        clock.lap("tree", inputs.mask)
        h = model(inputs.tokens, cache, inputs.positions, inputs.mask)[0]
        logits = model.logits(h)
        clock.lap("verify", logits, cache.state())
        best, a, bonus = acceptance(inputs.beams, inputs.node_of, logits, draft_lp, sampling)
        path = inputs.node_of[best]
        cache.copy_path(start, path)
        clock.lap("accept+commit", bonus, cache.state())
        beams_next, draft_lp = draft(h[path[a]], bonus)
        clock.lap("draft", beams_next, draft_lp)
        # one device-to-host copy per step: [best, a, next beams...]
        result = mx.concatenate([mx.stack([best, a]).astype(mx.int32), beams_next.reshape(-1)])
        mx.eval(result, draft_lp, cache.state())
        result = np.array(result)
        best_i, a_i = int(result[0]), int(result[1])
        cache.truncate(start + a_i + 1)
        emitted = beams_np[best_i, : a_i + 1].tolist()
        if lookup is not None:
            lookup.extend(emitted)
        beams_np = with_lookup_beam(result[2:].reshape(shape.width, shape.length), lookup)
        clock.lap("host")
        yield emitted, a_i


class _Clock:
    """Optional per-phase timing for speculative_steps (a no-op without a profile dict)."""

    def __init__(self, profile: Optional[Dict[str, float]]):
        self.profile = profile
        self.t = 0.0

    def start(self):
        if self.profile is not None:
            self.t = time.perf_counter()

    def lap(self, name: str, *arrays):
        if self.profile is None:
            return
        mx.eval(*arrays)
        now = time.perf_counter()
        self.profile[name] = self.profile.get(name, 0.0) + now - self.t
        self.t = now
