"""The tree verified each step: the drafter's most probable prefixes plus the lookup beam, on the device.

Beam search keeps W prefixes at every depth, all distinct (`DraftLevels`). Every
depth's prefixes together form a tree of 1 + D * W nodes; the `budget` of them
with the highest drafter path probability (EAGLE-2's rule) are verified. A
child's path probability never exceeds its parent's, so the chosen set always
holds its nodes' ancestors, and a longer draft never verifies fewer good short
prefixes (Apple's tree keeps only the final W beams). The context-lookup
proposal adds Dl nodes (`BeamShape.lookup_depth`); where it repeats a tree prefix it is an alias, not a
node, so the children of every node stay distinct (which the sampled
acceptance rule needs). Shapes depend only on (B, budget, D, Dl): built once.

Worked example, W = 2, Lb = 3 (D = 2), budget 3, g0 = 7, lookup [3, 8]:

    levels  depth 1: 3 (-0.1), 5 (-2.3)      depth 2: 3 9 (-0.4), 3 4 (-1.9)
    ranked  3 (-0.1), 3 9 (-0.4), 3 4 (-1.9)        (5 at -2.3 is left out)
    nodes   0:7  1:3  2:9  3:4  | lookup 4:(3, alias of 1, not live)  5:8
    parents 0    0    1    1    |        0                            1
    ancestors of node 5: {0, 1, 5}
"""

import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .beam_search import DraftLevels
from .sampling import SamplingConfig, choose_tokens

RANK_TIE_BREAK = 1e-3  # per depth: a child always ranks strictly below its parent, even at log-prob 0


class DraftTree(NamedTuple):
    """N = 1 + budget + K * Dl nodes per row (fewer after `trim`); node 0 is g0, nodes past the budget the K
    lookup beams (Dl = `BeamShape.lookup_depth`, D unless the lookup beam reaches further; L = max(D, Dl) + 1).

    tokens (B, N) int32, parents (B, N) int32 (the root is its own parent),
    depth (B, N) int32, live (B, N) bool (False: padding or alias, never accepted),
    ancestors (B, N, N) bool: ancestors[b, i, j] when j is i or an ancestor of i,
    hops (B, N, L) int32: node i, its parent, its grandparent, ... (the root repeats),
    score (B, N) float32: the drafter's log-probability of node i's prefix (0 at the root and the lookup beam).
    """

    tokens: mx.array
    parents: mx.array
    depth: mx.array
    live: mx.array
    ancestors: mx.array
    hops: mx.array
    score: mx.array


def ranked_tree(levels: DraftLevels, g0: mx.array, lookup: mx.array, found: mx.array, budget: int,
                final_beams: bool = False) -> DraftTree:
    """The verified tree (module docstring). g0 (B,); lookup (B, K, Dl) proposals (or one, (B, Dl)),
    each used where found (B, K) (or (B,)).

    final_beams: only the prefixes of the final W beams (Apple's tree), budget W * D.
    """
    B, D, W = levels.tokens.shape
    scores = _on_final_beams(levels) if final_beams else levels.scores
    flat_scores = scores.reshape(B, D * W)
    depth_of = mx.arange(D * W) // W + 1
    key = flat_scores - RANK_TIE_BREAK * depth_of
    top = mx.argsort(-key, axis=-1)[:, :budget]  # (B, budget) candidate index, best first
    # where each candidate sits among the nodes (0 = not chosen; node 0 is the root)
    slot = mx.put_along_axis(mx.zeros((B, D * W), mx.int32), top, mx.broadcast_to(mx.arange(1, budget + 1, dtype=mx.int32), top.shape), axis=-1)
    depth = depth_of[top].astype(mx.int32)
    parent_candidate = (depth - 2) * W + mx.take_along_axis(levels.parents.reshape(B, D * W), top, axis=-1)
    parent_slot = mx.take_along_axis(slot, mx.maximum(parent_candidate, 0), axis=-1)
    parents = mx.where(depth == 1, 0, parent_slot)
    tokens = mx.take_along_axis(levels.tokens.reshape(B, D * W), top, axis=-1)
    # a child outranks its parent only at an exact tie (|score| past ~16k in fp32): never accept it then
    live = mx.isfinite(mx.take_along_axis(flat_scores, top, axis=-1)) & ((depth == 1) | (parent_slot > 0))
    tokens = mx.concatenate([g0.astype(mx.int32)[:, None], tokens], axis=1)
    parents = mx.concatenate([mx.zeros((B, 1), mx.int32), parents], axis=1)
    depth = mx.concatenate([mx.zeros((B, 1), mx.int32), depth], axis=1)
    live = mx.concatenate([mx.ones((B, 1), mx.bool_), live], axis=1)
    if lookup.ndim == 2:
        lookup, found = lookup[:, None], found[:, None]
    for k in range(lookup.shape[1]):  # a later beam may repeat an earlier one's prefix: an alias of its nodes
        tokens, parents, depth, live = _add_lookup(tokens, parents, depth, live, lookup[:, k], found[:, k])
    hops = _hops(parents, max(D, lookup.shape[2]) + 1)
    nodes = mx.arange(tokens.shape[1])
    ancestors = (hops[:, :, :, None] == nodes).any(axis=2)
    score = mx.concatenate([mx.zeros((B, 1)), mx.take_along_axis(flat_scores, top, axis=-1),
                            mx.zeros((B, lookup.shape[1] * lookup.shape[2]))], axis=1)
    return DraftTree(tokens, parents, depth, live, ancestors, hops, score)


def trim(tree: DraftTree, budget: int, min_prob: float) -> DraftTree:
    """The tree without the drafted nodes whose prefix probability is below `min_prob` and without the
    dead nodes (a lookup beam that found nothing, its aliases), in every row where no row needs them; the
    ancestors of what is kept stay. A position kept for one row is dead (never accepted) in a row that
    does not need it. (Where the lookup beam repeats a drafted prefix below `min_prob`, it is an alias
    of those nodes and goes with them.) Reads the tree on the host (a sync); the verify then computes fewer rows.

    In the module example with min_prob 0.5: node 3 (prefix 3 4, p = exp(-1.9) = 0.15) and the dead
    alias 4 go; nodes 0 1 2 5 remain as 0:7 1:3 2:9 3:8, the last one's parent still 1.
    """
    mx.eval(tree.score, tree.live, tree.ancestors)
    score, live, ancestors = np.array(tree.score), np.array(tree.live), np.array(tree.ancestors)
    N = score.shape[1]
    drafted = (np.arange(N) >= 1) & (np.arange(N) <= budget)
    floor = math.log(min_prob) if min_prob > 0 else -math.inf
    wanted = live & (~drafted | (score >= floor))
    wanted[:, 0] = True
    need = (ancestors & wanted[:, :, None]).any(axis=1)  # (B, N): each row's wanted nodes and their ancestors
    keep = need.any(axis=0)
    if keep.all():
        return tree._replace(live=mx.array(live & need))
    index = mx.array(np.flatnonzero(keep).astype(np.int32))
    new_index = mx.array((np.cumsum(keep) - 1).astype(np.int32))  # old node -> kept position
    # a position kept for another row is dead in a row that does not need it: its parent there may be gone
    return DraftTree(tree.tokens[:, index], new_index[tree.parents[:, index]], tree.depth[:, index],
                     mx.array(live & need)[:, index], tree.ancestors[:, index][:, :, index],
                     new_index[tree.hops[:, index]], tree.score[:, index])


def _on_final_beams(levels: DraftLevels) -> mx.array:
    """levels.scores where the prefix leads to one of the final W beams, else -inf."""
    B, D, W = levels.tokens.shape
    on = [mx.ones((B, W), mx.bool_)]
    for d in range(D - 1, 0, -1):  # a prefix is on a final beam when one of its children is
        parent_hit = mx.arange(W)[None, :, None] == levels.parents[:, d, None, :]  # (B, W parent, W child)
        on.append((parent_hit & on[-1][:, None, :]).any(axis=-1))
    return mx.where(mx.stack(on[::-1], axis=1), levels.scores, -mx.inf)


def _add_lookup(tokens, parents, depth, live, lookup, found):
    """Append the lookup beam's Dl nodes; those repeating a tree prefix become dead aliases."""
    B, n = tokens.shape
    alias = mx.zeros((B,), mx.int32)  # tree node equal to the lookup prefix so far (-1: none)
    prev = alias
    extra_parents, extra_live = [], []
    for k in range(lookup.shape[1]):
        token = lookup[:, k].astype(mx.int32)
        same = live & (depth == k + 1) & (parents == alias[:, None]) & (tokens == token[:, None])
        is_alias = same.any(axis=-1) & (alias >= 0)
        extra_parents.append(mx.where(alias >= 0, alias, prev))
        extra_live.append(found & ~is_alias)
        prev = mx.full((B,), n + k, mx.int32)
        alias = mx.where(is_alias, mx.argmax(same, axis=-1).astype(mx.int32), -1)
    new_parents = mx.stack(extra_parents, axis=1)
    new_depth = mx.broadcast_to(mx.arange(1, lookup.shape[1] + 1, dtype=mx.int32), new_parents.shape)
    return (mx.concatenate([tokens, lookup.astype(mx.int32)], axis=1), mx.concatenate([parents, new_parents], axis=1),
            mx.concatenate([depth, new_depth], axis=1), mx.concatenate([live, mx.stack(extra_live, axis=1)], axis=1))


def _hops(parents: mx.array, length: int) -> mx.array:
    """(B, N, length): each node, then its ancestors one hop at a time (the root repeats)."""
    chain = [mx.broadcast_to(mx.arange(parents.shape[1], dtype=mx.int32), parents.shape)]
    for _ in range(length - 1):
        chain.append(mx.take_along_axis(parents, chain[-1], axis=1))
    return mx.stack(chain, axis=2)


def tree_targets(tree: DraftTree, logits: mx.array, cfg: SamplingConfig, walk: bool = True) -> mx.array:
    """The base model's token at the nodes `accept` reads (B, N) from the tree's logits (B, N, V).

    Greedy, or walk False: the argmax or one draw at every node. Sampled with walk: one draw
    per node *on the walk* from the root down the children that match, -1 elsewhere.
    `accept`'s outcome depends only on the draws at the nodes of that walk, and draws at
    different nodes are independent, so both give the same distribution; the walk makes L
    draws instead of N (on the CPU a draw over the vocabulary is most of a sampled step's
    cost) but in L dependent rounds of small kernels (on a GPU one draw over N rows costs
    about what one row costs).
    """
    if cfg.greedy or not walk:
        return choose_tokens(logits, cfg)
    B, N, _ = logits.shape
    nodes = mx.arange(N)
    node, walking = mx.zeros((B,), mx.int32), mx.ones((B,), mx.bool_)
    targets = mx.full((B, N), -1, mx.int32)
    for _ in range(tree.hops.shape[2]):
        draw = choose_tokens(mx.take_along_axis(logits, node[:, None, None], axis=1)[:, 0], cfg)
        here = walking[:, None] & (nodes == node[:, None])
        targets = mx.where(here, draw[:, None], targets)
        child = tree.live & (nodes > 0) & (tree.parents == node[:, None]) & (tree.tokens == draw[:, None])
        walking = walking & child.any(axis=-1)
        node = mx.where(walking, mx.argmax(child, axis=-1).astype(mx.int32), node)
    return targets


class Accepted(NamedTuple):
    """Per row: `count` drafted tokens accepted (B,), the accepted `path` (B, L) of node
    indices root first (entries past count repeat the last), `best` node (B,), the
    base model's `bonus` token after it (B,), and `tokens` (B, L) emitted (g0 + accepted)."""

    count: mx.array
    path: mx.array
    best: mx.array
    bonus: mx.array
    tokens: mx.array


def accept(tree: DraftTree, targets: mx.array) -> Accepted:
    """The one acceptance rule: a node is accepted when it and all its ancestors drafted the
    token the base model chose at their parent (targets (B, N): `tree_targets`).

    Children of a node are distinct, so at most one child matches its parent's target and the
    accepted nodes form a single chain; its deepest node is `best`. Exact for sampling
    (README, "Lossless sampling"); equal to plain greedy decoding when targets are argmaxes.
    """
    ok = tree.live & (tree.tokens == mx.take_along_axis(targets, tree.parents, axis=1))
    ok = ok | (mx.arange(ok.shape[1]) == 0)
    accepted = ~(tree.ancestors & ~ok[:, None, :]).any(axis=-1)
    best = mx.argmax(mx.where(accepted, tree.depth, -1), axis=-1).astype(mx.int32)
    count = mx.take_along_axis(tree.depth, best[:, None], axis=1)[:, 0]
    chain = mx.take_along_axis(tree.hops, best[:, None, None], axis=1)[:, 0]  # (B, L) best, parent, ...
    hop = mx.maximum(count[:, None] - mx.arange(chain.shape[1]), 0)
    path = mx.take_along_axis(chain, hop, axis=1)
    bonus = mx.take_along_axis(targets, best[:, None], axis=1)[:, 0]
    return Accepted(count, path, best, bonus, mx.take_along_axis(tree.tokens, path, axis=1))
