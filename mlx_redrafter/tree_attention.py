"""Dynamic tree attention: verify W beams that share prefixes in one forward pass.

A prefix (b, j) that equals the prefix of an earlier beam b' < b is a
duplicate; each distinct prefix becomes one node. Nodes are packed depth by
depth (the root g0 is node 0), each attends to the committed cache and to its
ancestors, and sits at position committed_length + depth. Worked example:

    beams  [[7, 3, 9],          nodes  0:7  1:3  2:5  3:9  4:4  5:2
            [7, 3, 4],          depth   0    1    1    2    2    2
            [7, 5, 2]]          parent  -    0    0    1    1    2
    node_of = [[0, 1, 3], [0, 1, 4], [0, 2, 5]]   (W, Lb) -> node index
    mask row of node 4 (token 4): nodes {0, 1, 4} visible

The packed size n varies from Lb to W * Lb; it is padded to a power of two up
to `bucket`, to a multiple of `bucket` up to 4 * bucket, then to a power of two
again, so the device sees few distinct shapes (padding nodes see themselves;
on a GPU each new shape builds kernels) while the small trees the CPU uses
stay small (there a verify pass costs ~25% more at 8 tokens than at 4).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class Tree:
    tokens: np.ndarray  # (n_pad,) token of each node (0 for padding)
    depth: np.ndarray  # (n_pad,)
    node_of: np.ndarray  # (W, Lb) packed index of beam b's prefix of length j + 1
    mask: np.ndarray  # (n_pad, n_pad) bool, ancestor-or-self
    size: int  # n, distinct nodes before padding


def padded_size(n: int, bucket: int, most: int) -> int:
    """Powers of two up to `bucket`, multiples of it up to 4 * bucket, powers of two beyond."""
    if n <= bucket:
        return min(1 << (n - 1).bit_length(), bucket)
    size = -(-n // bucket) * bucket if n <= 4 * bucket else 1 << (n - 1).bit_length()
    return min(size, -(-most // bucket) * bucket)


def build_tree(beams: np.ndarray, bucket: int = 8) -> Tree:
    """Pack beams (W, Lb) into a prefix tree; see the module docstring."""
    W, Lb = beams.shape
    # same[b', b, j]: beams b' and b agree on tokens 0..j
    same = np.cumprod(beams[:, None, :] == beams[None, :, :], axis=2).astype(bool)
    owner = same.argmax(axis=0)  # (W, Lb): first beam holding prefix (b, j)
    is_new = owner == np.arange(W)[:, None]
    order = np.argwhere(is_new.T)  # (depth, beam) pairs, depth-major
    n = len(order)
    index = np.full((W, Lb), -1, dtype=np.int32)
    index[order[:, 1], order[:, 0]] = np.arange(n)
    node_of = index[owner, np.arange(Lb)[None, :]]
    n_pad = padded_size(n, bucket, W * Lb)
    tokens = np.zeros(n_pad, dtype=np.int32)
    depth = np.zeros(n_pad, dtype=np.int32)
    tokens[:n] = beams[order[:, 1], order[:, 0]]
    depth[:n] = order[:, 0]
    mask = np.eye(n_pad, dtype=bool)
    # each beam's nodes see every earlier node on the same beam
    rows = node_of[:, :, None].repeat(Lb, axis=2)
    cols = node_of[:, None, :].repeat(Lb, axis=1)
    causal = np.tril(np.ones((Lb, Lb), dtype=bool))[None].repeat(W, axis=0)
    mask[rows[causal], cols[causal]] = True
    return Tree(tokens, depth, node_of, mask, n)


@dataclass
class TreeInputs:
    """A tree's arrays on the device, for one verify pass."""

    tokens: mx.array  # (1, n_pad)
    positions: mx.array  # (1, n_pad) committed + depth
    mask: mx.array  # (n_pad, span) bool: the cache, then the tree's ancestors
    node_of: mx.array  # (W, Lb)
    beams: mx.array  # (W, Lb)


def to_device(tree: Tree, beams: np.ndarray, committed: int, span: int) -> TreeInputs:
    """Send a tree to the device in one host-to-device copy (on a GPU each copy costs ~1 ms).

    The mask covers `span` >= committed + n_pad cache slots: all committed
    slots, the tree's ancestor-or-self mask after them, nothing beyond. A span
    fixed between steps (`KVCache.span_for`) keeps the attention shape fixed.
    """
    n_pad, (W, Lb) = len(tree.tokens), beams.shape
    parts = [[committed], tree.tokens, committed + tree.depth, tree.node_of.ravel(), beams.ravel(), tree.mask.ravel()]
    packed = mx.array(np.concatenate(parts).astype(np.int32))
    ends = np.cumsum([len(p) for p in parts])
    start, tokens, positions, node_of, beam_tokens, tree_mask = (
        packed[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends))
    mask = mx.arange(max(span, committed + n_pad))[None] < start  # the committed cache
    mask = mx.broadcast_to(mask, (n_pad, mask.shape[1]))
    mask = mx.slice_update(mask, tree_mask.reshape(n_pad, n_pad) > 0, mx.concatenate([mx.zeros_like(start), start]), (0, 1))
    return TreeInputs(tokens[None], positions[None], mask, node_of.reshape(W, Lb), beam_tokens.reshape(W, Lb))
