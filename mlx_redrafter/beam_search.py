"""Beam search over the drafter, entirely on the device (no host round trip).

Beam length Lb counts the base model's own next token g0, as Apple's code
does; the drafter runs Lb - 1 steps. (TensorRT-LLM's draft_len_per_beam is
Lb - 1.) Worked example, W = 2, Lb = 3, g0 = 7:

    step 1: one live beam [7]; its top-2 next tokens 3, 5   -> [7 3], [7 5]
    step 2: top-2 of the 2 x V continuations               -> [7 3 9], [7 3 4]
    result tokens (2, 3) = [[7, 3, 9], [7, 3, 4]], both starting with g0
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Tuple

import mlx.core as mx

from . import backend


MAX_WIDTH = 128  # beams: past this the tree costs more than it can accept, and memory grows as W x V
MAX_LENGTH = 16  # tokens per beam, g0 included


@dataclass(frozen=True)
class BeamShape:
    width: int = 4  # W: beams kept
    length: int = 4  # Lb: tokens per beam, g0 included
    lookup: bool = True  # also verify a beam copied from earlier in the context (lookup.py)

    def __post_init__(self):
        if not (1 <= self.width <= MAX_WIDTH and 2 <= self.length <= MAX_LENGTH):
            raise ValueError(f"beam width must be in 1..{MAX_WIDTH} and beam length in 2..{MAX_LENGTH}, "
                             f"got {self.width} x {self.length}")


# Fastest W x Lb measured with the default model and drafter (README, "Speed"). On a
# GPU a verify pass costs about the same for 8 or 264 tree tokens, so wide trees pay
# (32 x 8 tied for fastest on the H100, and accepts the most of those); on the CPU the
# cost grows with the tree and 4 x 4 is fastest.
DEFAULT_SHAPE = {"gpu": (32, 8), "cpu": (4, 4)}


def default_shape(width: Optional[int] = None, length: Optional[int] = None, lookup: bool = True) -> BeamShape:
    """The default beam shape for the current device, with any of W and Lb given overriding it."""
    w, lb = DEFAULT_SHAPE["gpu" if backend.on_gpu() else "cpu"]
    return BeamShape(width or w, length or lb, lookup)


def beam_search(drafter, base, hidden: mx.array, g0: mx.array, shape: BeamShape) -> Tuple[mx.array, mx.array]:
    """Draft W beams of Lb tokens.

    hidden: (H,) base model's last hidden state; g0: () the base model's next token.
    Returns tokens (W, Lb) int32 with tokens[:, 0] == g0, and the drafter's
    log-probability of each drafted token, (W, Lb - 1).
    """
    W = shape.width
    g0 = g0.reshape(1).astype(mx.int32)
    tokens = mx.broadcast_to(g0[None], (W, 1))
    scores = mx.where(mx.arange(W) == 0, 0.0, -mx.inf)  # one live beam at first
    state = mx.zeros((W, hidden.shape[-1]), dtype=hidden.dtype)
    last = mx.broadcast_to(g0, (W,))
    token_logprobs = mx.zeros((W, 0))
    for _ in range(shape.length - 1):
        state = drafter.next_state(state, base.embed(last))
        logprobs = nn_log_softmax(drafter(hidden, state, base))  # (W, Vd)
        vocab = logprobs.shape[-1]
        candidates = (scores[:, None] + logprobs).reshape(-1)
        top = mx.argpartition(-candidates, W - 1)[:W]
        top = top[mx.argsort(-candidates[top])]  # best beam first
        beam, draft_id = top // vocab, top % vocab
        step_logprob = logprobs.reshape(-1)[top]
        scores = candidates[top]
        state = state[beam]
        last = drafter.to_token_ids(draft_id).astype(mx.int32)
        tokens = mx.concatenate([tokens[beam], last[:, None]], axis=1)
        token_logprobs = mx.concatenate([token_logprobs[beam], step_logprob[:, None]], axis=1)
    return tokens, token_logprobs


def compiled_beam_search(drafter, base, shape: BeamShape) -> Callable[[mx.array, mx.array], Tuple[mx.array, mx.array]]:
    """beam_search(drafter, base, ., ., shape) as one compiled graph: its ~15 small ops per
    drafted position are traced once, and fused where they can be (fewer launches on a GPU)."""
    return mx.compile(partial(beam_search, drafter, base, shape=shape))


def nn_log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
