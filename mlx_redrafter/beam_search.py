"""Beam search over the drafter, entirely on the device (no host round trip).

Beam length Lb counts the base model's own next token g0, as Apple's code
does; the drafter runs Lb - 1 steps. (TensorRT-LLM's draft_len_per_beam is
Lb - 1.) Worked example, W = 2, Lb = 3, g0 = 7:

    step 1: one live beam [7]; its top-2 next tokens 3, 5   -> [7 3], [7 5]
    step 2: top-2 of the 2 x V continuations               -> [7 3 9], [7 3 4]
    result tokens (2, 3) = [[7, 3, 9], [7, 3, 4]], both starting with g0
"""

import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from . import backend


MAX_WIDTH = 128  # beams: past this the tree costs more than it can accept, and memory grows as W x V
MAX_LENGTH = 16  # tokens per beam, g0 included
MAX_LOOKUP_BEAMS = 8  # copies of earlier occurrences, each lookup_depth more verified nodes per step


@dataclass(frozen=True)
class BeamShape:
    """The drafter's search per step: W beams of Lb tokens, and how many drafted nodes are verified.

    >>> mr.generate(model, tokenizer, "Hi", beam=mr.BeamShape(width=8, length=5, nodes=16))
    >>> mr.BeamShape(4, 4, lookup=False, tree="beams")   # Apple's final beams, no context lookup
    >>> mr.BeamShape(32, 6, nodes=32, lookup_beams=4)    # four copies from the context, not one
    """

    width: int = 4  # W: beams kept
    length: int = 4  # Lb: tokens per beam, g0 included
    lookup: bool = True  # also verify a beam copied from earlier in the context (lookup.py)
    nodes: int = 0  # drafted nodes verified per step, the most probable first (0: all W x (Lb - 1))
    tree: str = "ranked"  # "ranked": best `nodes` prefixes of every depth; "beams": Apple's final W beams
    # tokens the lookup beam proposes after g0 (0: Lb - 1, as many as a beam). A copy that matches
    # often goes on matching, and its nodes cost no drafter work, so it may reach past Lb.
    lookup_length: int = 0
    # drafted nodes whose prefix probability (the drafter's) is below this are not verified (0: the whole
    # budget). The host reads each step's draft to cut them (a sync): for the CPU, where every verified node costs.
    min_prob: float = 0.0
    # context-lookup beams, each copying another earlier occurrence (lookup.py): more verified nodes, no drafter work
    lookup_beams: int = 1

    def __post_init__(self):
        counts = {"width": self.width, "length": self.length, "nodes": self.nodes, "lookup_length": self.lookup_length,
                  "lookup_beams": self.lookup_beams}
        for name, value in counts.items():  # a float or a string here fails deep inside MLX otherwise
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, numbers.Real):
            raise ValueError(f"min_prob must be a number, got {self.min_prob!r}")
        if not isinstance(self.lookup, bool):
            raise ValueError(f"lookup must be True or False, got {self.lookup!r}")
        if self.tree not in ("ranked", "beams"):
            raise ValueError(f"tree must be 'ranked' or 'beams', got {self.tree!r}")
        if self.nodes < 0:
            raise ValueError(f"nodes must be >= 0, got {self.nodes}")
        if not (1 <= self.width <= MAX_WIDTH and 2 <= self.length <= MAX_LENGTH):
            raise ValueError(f"beam width must be in 1..{MAX_WIDTH} and beam length in 2..{MAX_LENGTH}, "
                             f"got {self.width} x {self.length}")
        if not 0 <= self.lookup_length <= MAX_LENGTH:
            raise ValueError(f"lookup length must be in 0..{MAX_LENGTH} (0: beam length - 1), got {self.lookup_length}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob (--min-prob) must be in [0, 1), got {self.min_prob}")
        if self.lookup_length and not self.lookup:
            raise ValueError("a lookup length needs the context-lookup beam: drop --no-lookup (lookup=False) "
                             "or the lookup length")
        if not 1 <= self.lookup_beams <= MAX_LOOKUP_BEAMS:
            raise ValueError(f"lookup beams must be in 1..{MAX_LOOKUP_BEAMS}, got {self.lookup_beams}")
        if self.lookup_beams > 1 and not self.lookup:
            raise ValueError("lookup beams need the context lookup: drop --no-lookup (lookup=False) or the lookup beams")

    @property
    def lookup_depth(self) -> int:
        """Nodes of the lookup beam (Lb - 1 dead ones when lookup is off: its length is then 0)."""
        return self.lookup_length or self.length - 1

    @property
    def lookup_nodes(self) -> int:
        """Tree nodes of the lookup beams (`lookup_depth` dead ones when lookup is off)."""
        return self.lookup_beams * self.lookup_depth

    @property
    def emit_length(self) -> int:
        """The most tokens one step can emit: g0 and the deepest accepted chain."""
        return 1 + max(self.length - 1, self.lookup_depth)


# Fastest settings measured with the default model and drafter (README, "Speed"): W x Lb
# is the beam search, nodes the drafted prefixes verified per step (the most probable of
# every depth; 0 = all W x (Lb - 1)). On a GPU a verify pass costs nearly the same for 8 or
# 64 tree tokens; on the CPU every verified token costs, so the tree stays small.
# Then the lookup beam's length (0: Lb - 1), and the least drafter prefix probability verified
# (0: the whole budget; on the CPU a cheaper verify of the likely nodes wins, README "Speed").
# The GPU's 16 x 8 / 56 fills the 64 rows of cuda_matmul's few-row kernel (56 nodes, g0 and a 7-token lookup
# beam; a longer lookup or more lookup beams leave the kernel): on an H100 it beat 32 x 6 / 32 greedy by 3-8%
# and was level sampled (README, "On the GPU, 56 nodes in the kernel pay"); not measured on Metal.
DEFAULT_SHAPE = {"gpu": (16, 8, 56, 0, 0.0), "cpu": (4, 4, 0, 0, 0.1)}


def default_shape(width: Optional[int] = None, length: Optional[int] = None, lookup: bool = True,
                  nodes: Optional[int] = None, tree: str = "ranked", lookup_length: Optional[int] = None,
                  min_prob: Optional[float] = None, lookup_beams: Optional[int] = None) -> BeamShape:
    """The default settings for the current device, with any of W, Lb, nodes, lookup length,
    min_prob and lookup beams given overriding them.

    >>> mr.default_shape()                 # BeamShape(16, 8, nodes=56) on a GPU, (4, 4, min_prob=0.1) on the CPU
    >>> mr.default_shape(length=5)         # the device's default with Lb = 5
    >>> mr.default_shape(lookup_length=12) # ... with a 12-token context-lookup beam
    >>> mr.default_shape(min_prob=0)       # ... verifying every drafted node of the budget
    >>> mr.default_shape(lookup_beams=2)   # ... with two context-lookup beams
    """
    w, lb, n, ll, mp = DEFAULT_SHAPE["gpu" if backend.on_gpu() else "cpu"]
    return BeamShape(width or w, length or lb, lookup, n if nodes is None else nodes, tree,
                     (ll if lookup else 0) if lookup_length is None else lookup_length,
                     mp if min_prob is None else min_prob, lookup_beams or 1)


class DraftLevels(NamedTuple):
    """Everything a beam search saw, depth by depth (D = Lb - 1 drafted depths), batch-shaped.

    tokens  (B, D, W)  token of beam w after depth d + 1
    parents (B, D, W)  the beam at depth d - 1 it extends (0 at d = 0: the root g0)
    scores  (B, D, W)  cumulative drafter log-probability of that prefix
    The W prefixes of one depth are distinct (top-W of distinct (parent, token)
    pairs), so the levels form a tree of 1 + D * W nodes with no duplicates.
    """

    tokens: mx.array
    parents: mx.array
    scores: mx.array


def draft_levels(drafter, base, hidden: mx.array, g0: mx.array, shape: BeamShape) -> DraftLevels:
    """Beam search from hidden (B, F) (`Drafter.base_features`) and the base model's next tokens g0 (B,);
    see `DraftLevels`."""
    hidden = drafter.context(hidden)  # (B, H)
    B, W = g0.shape[0], shape.width
    scores = mx.broadcast_to(mx.where(mx.arange(W) == 0, 0.0, -mx.inf), (B, W))  # one live beam at first
    state = mx.zeros((B, W, hidden.shape[-1]), dtype=hidden.dtype)
    last = mx.broadcast_to(g0.astype(mx.int32)[:, None], (B, W))
    rows = mx.arange(B)[:, None]
    levels = []
    for _ in range(shape.length - 1):
        state = drafter.next_state(state, base.embed(last))
        logprobs = nn_log_softmax(drafter(hidden[:, None], state, base))  # (B, W, Vd)
        beam, draft_id, scores = top_beams(scores[..., None] + logprobs, W)
        state = state[rows, beam]
        last = drafter.to_token_ids(draft_id).astype(mx.int32)
        levels.append((last, beam.astype(mx.int32), scores))
    tokens, parents, scores = (mx.stack(x, axis=1) for x in zip(*levels))
    return DraftLevels(tokens, parents, scores)


def top_beams(candidates: mx.array, W: int) -> Tuple[mx.array, mx.array, mx.array]:
    """The W best of candidates (B, W, Vd) (each beam's score plus its next token's log-probability),
    best first: (beam, draft id, score), each (B, W)."""
    B, _, vocab = candidates.shape
    flat = candidates.reshape(B, -1)
    top = mx.argpartition(-flat, W - 1, axis=-1)[:, :W]
    top = mx.take_along_axis(top, mx.argsort(-mx.take_along_axis(flat, top, axis=-1), axis=-1), axis=-1)
    return top // vocab, top % vocab, mx.take_along_axis(flat, top, axis=-1)


def beam_search(drafter, base, hidden: mx.array, g0: mx.array, shape: BeamShape) -> Tuple[mx.array, mx.array]:
    """Draft W beams of Lb tokens: the final beams of `draft_levels` (Apple's tree).

    hidden: (H,) base model's last hidden state; g0: () the base model's next token.
    Returns tokens (W, Lb) int32 with tokens[:, 0] == g0, and the drafter's
    log-probability of each drafted token, (W, Lb - 1).
    """
    levels = draft_levels(drafter, base, hidden.reshape(1, -1), g0.reshape(1), shape)
    tokens, parents, scores = (x[0] for x in levels)  # (D, W)
    D, W = tokens.shape
    beam = mx.arange(W)
    columns, step_scores = [], []
    for d in range(D - 1, -1, -1):  # walk each final beam back to the root
        columns.append(tokens[d, beam])
        step_scores.append(scores[d, beam])
        beam = parents[d, beam]
    g0 = mx.broadcast_to(g0.reshape(1, 1).astype(mx.int32), (W, 1))
    cumulative = mx.stack(step_scores[::-1], axis=1)
    logprobs = cumulative - mx.concatenate([mx.zeros((W, 1)), cumulative[:, :-1]], axis=1)
    return mx.concatenate([g0, mx.stack(columns[::-1], axis=1)], axis=1), logprobs


def nn_log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
