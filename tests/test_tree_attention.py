"""Dynamic tree attention: prefix sharing, packing, masks and positions."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlx_redrafter.tree_attention import build_tree, to_device


def test_worked_example():
    tree = build_tree(np.array([[7, 3, 9], [7, 3, 4], [7, 5, 2]]), bucket=4)  # 6 nodes -> 8
    assert tree.size == 6 and len(tree.tokens) == 8
    assert tree.tokens[:6].tolist() == [7, 3, 5, 9, 4, 2]
    assert tree.depth[:6].tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.node_of.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert np.flatnonzero(tree.mask[4]).tolist() == [0, 1, 4]
    assert np.flatnonzero(tree.mask[7]).tolist() == [7]  # padding sees itself only


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(2, 6), st.integers(2, 4), st.integers(0, 10**6))
def test_tree_properties(W, Lb, vocab, seed):
    rng = np.random.default_rng(seed)
    beams = rng.integers(0, vocab, (W, Lb))
    beams[:, 0] = beams[0, 0]  # all beams start with g0
    tree = build_tree(beams)
    n = tree.size
    assert n == len({tuple(b[: j + 1]) for b in beams.tolist() for j in range(Lb)})
    size = len(tree.tokens)
    assert size >= n and (size % 8 == 0 or size in (1, 2, 4, 8))
    for b in range(W):
        path = tree.node_of[b]
        assert tree.tokens[path].tolist() == beams[b].tolist()
        assert tree.depth[path].tolist() == list(range(Lb))
        for j in range(Lb):
            assert set(np.flatnonzero(tree.mask[path[j]])) == set(path[: j + 1].tolist())
    assert (np.diff(tree.depth[:n]) >= 0).all()  # parents come first


@pytest.mark.parametrize("committed, span", [(0, 0), (5, 0), (5, 256), (250, 256), (300, 512)])
def test_device_inputs(committed, span):
    beams = np.array([[7, 3, 9], [7, 3, 4], [7, 5, 2]])
    tree = build_tree(beams, bucket=4)
    inputs = to_device(tree, beams, committed, span)
    n_pad = len(tree.tokens)
    want = np.zeros((n_pad, max(span, committed + n_pad)), dtype=bool)
    want[:, :committed] = True
    want[:, committed : committed + n_pad] = tree.mask
    assert np.array_equal(np.array(inputs.mask), want)
    assert np.array(inputs.positions).tolist() == [(committed + tree.depth).tolist()]
    assert np.array(inputs.tokens).tolist() == [tree.tokens.tolist()]
    assert np.array(inputs.node_of).tolist() == tree.node_of.tolist()
    assert np.array(inputs.beams).tolist() == beams.tolist()
