"""The verified tree and the one acceptance rule: structure, ranking, lookup aliases, final-beams mode."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings, strategies as st

from mlx_redrafter.beam_search import DraftLevels
from mlx_redrafter.draft_tree import accept, ranked_tree, trim

NEG = -mx.inf


def example_levels():
    """The module docstring's example: W = 2, depth 1: 3 (-0.1), 5 (-2.3); depth 2: 3 9, 3 4."""
    tokens = mx.array([[[3, 5], [9, 4]]])
    parents = mx.array([[[0, 0], [0, 0]]])
    scores = mx.array([[[-0.1, -2.3], [-0.4, -1.9]]])
    return DraftLevels(tokens, parents, scores)


def test_worked_example():
    tree = ranked_tree(example_levels(), mx.array([7]), mx.array([[3, 8]]), mx.array([True]), budget=3)
    assert np.array(tree.tokens).tolist() == [[7, 3, 9, 4, 3, 8]]
    assert np.array(tree.parents).tolist() == [[0, 0, 1, 1, 0, 1]]
    assert np.array(tree.depth).tolist() == [[0, 1, 2, 2, 1, 2]]
    assert np.array(tree.live).tolist() == [[True, True, True, True, False, True]]  # node 4 is an alias of 1
    assert np.flatnonzero(np.array(tree.ancestors[0, 5])).tolist() == [0, 1, 5]


def test_trim_keeps_the_likely_nodes_and_their_ancestors():
    """The docstring's example of `trim`: min_prob 0.5 drops node 3 (p = 0.15) and the dead alias 4; the
    lookup node keeps its parent; the same targets are accepted through the smaller tree."""
    tree = ranked_tree(example_levels(), mx.array([7]), mx.array([[3, 8]]), mx.array([True]), budget=3)
    cut = trim(tree, 3, 0.5)
    assert np.array(cut.tokens).tolist() == [[7, 3, 9, 8]]
    assert np.array(cut.parents).tolist() == [[0, 0, 1, 1]]
    assert np.flatnonzero(np.array(cut.ancestors[0, 3])).tolist() == [0, 1, 3]
    assert np.array(cut.hops[0, 3]).tolist() == [3, 1, 0]
    result = accept(cut, mx.array([[3, 8, 0, 6]]))
    assert int(result.count[0]) == 2 and np.array(result.tokens).tolist() == [[7, 3, 8]] and int(result.bonus[0]) == 6
    assert trim(tree, 3, 0.01).tokens.shape == (1, 5)  # only the dead alias goes
    assert trim(tree, 3, 0.99).tokens.shape == (1, 3)  # root, lookup node and its parent 3


def test_trim_keeps_what_any_row_needs():
    """Two rows: a position is cut only where no row wants it (row 0 wants two drafted nodes, row 1 one),
    and every kept node's parent is kept, in its own row."""
    levels = DraftLevels(mx.array([[[3, 5], [9, 4]], [[3, 5], [9, 4]]]), mx.array([[[0, 0], [0, 0]], [[0, 0], [1, 1]]]),
                         mx.array([[[-0.1, -2.3], [-0.4, -1.9]], [[-3.0, -0.2], [-3.1, -1.3]]]))
    tree = ranked_tree(levels, mx.array([7, 7]), mx.zeros((2, 2), mx.int32), mx.array([False, False]), budget=4)
    cut = trim(tree, 4, 0.5)
    assert cut.tokens.shape == (2, 3)  # the root and two drafted positions; the dead lookup beam goes
    rows = [[tuple(_prefix(i, t, p)) for i in range(3)] for t, p in zip(np.array(cut.tokens), np.array(cut.parents))]
    assert rows == [[(7,), (7, 3), (7, 3, 9)], [(7,), (7, 5), (7, 5, 4)]]
    depth, parents = np.array(cut.depth), np.array(cut.parents)
    assert all(depth[b, parents[b, i]] == depth[b, i] - 1 for b in range(2) for i in range(1, 3))


def test_accept_follows_the_targets():
    tree = ranked_tree(example_levels(), mx.array([7]), mx.array([[3, 8]]), mx.array([True]), budget=3)
    # base model: after 7 -> 3, after 7 3 -> 8 (the lookup's node), after 7 3 8 -> 6
    targets = mx.array([[3, 8, 0, 0, 0, 6]])
    result = accept(tree, targets)
    assert int(result.count[0]) == 2 and int(result.best[0]) == 5 and int(result.bonus[0]) == 6
    assert np.array(result.path).tolist() == [[0, 1, 5]]
    assert np.array(result.tokens).tolist() == [[7, 3, 8]]
    none = accept(tree, mx.array([[1, 1, 1, 1, 1, 1]]))  # the root's own target only
    assert int(none.count[0]) == 0 and int(none.bonus[0]) == 1 and np.array(none.tokens)[0, 0] == 7


def test_dead_lookup_and_dead_tree_nodes_are_never_accepted():
    levels = DraftLevels(mx.array([[[3, 5]]]), mx.array([[[0, 0]]]), mx.array([[[-0.1, NEG]]]))
    tree = ranked_tree(levels, mx.array([7]), mx.array([[5]]), mx.array([False]), budget=2)
    assert np.array(tree.live).tolist() == [[True, True, False, False]]
    assert int(accept(tree, mx.array([[5, 0, 0, 0]])).count[0]) == 0


def test_final_beams_mode_keeps_only_their_prefixes():
    # depth 1: a, b; depth 2 beams both extend a: prefix b is off the final beams
    levels = DraftLevels(mx.array([[[3, 5], [9, 4]]]), mx.array([[[0, 0], [0, 0]]]), mx.array([[[-0.1, -0.2], [-0.4, -0.5]]]))
    tree = ranked_tree(levels, mx.array([7]), mx.array([[0, 0]]), mx.array([False]), budget=4, final_beams=True)
    live = np.array(tree.live)[0]
    assert sorted(np.array(tree.tokens)[0][live].tolist()) == [3, 4, 7, 9]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), W=st.integers(1, 4), D=st.integers(1, 4), vocab=st.integers(2, 6))
def test_ranked_trees_are_closed_and_nested(seed, W, D, vocab):
    """Every chosen node's parent is chosen; a larger budget verifies a superset of prefixes."""
    rng = np.random.default_rng(seed)
    parents = rng.integers(0, W, (1, D, W)); parents[:, 0] = 0
    steps = -rng.exponential(1.0, (1, D, W))
    scores = np.zeros((1, D, W))
    for d in range(D):
        scores[:, d] = (scores[0, d - 1, parents[0, d]] if d else 0) + steps[:, d]
    levels = DraftLevels(mx.array(rng.integers(0, vocab, (1, D, W))), mx.array(parents), mx.array(scores, dtype=mx.float32))
    prefixes = {}
    for budget in range(1, W * D + 1):
        tree = ranked_tree(levels, mx.array([0]), mx.zeros((1, D), mx.int32), mx.array([False]), budget)
        tokens, par, depth = (np.array(x)[0] for x in (tree.tokens, tree.parents, tree.depth))
        live = np.array(tree.live)[0]
        assert all(depth[par[i]] == depth[i] - 1 for i in range(1, 1 + budget))
        chosen = {tuple(_prefix(i, tokens, par)) for i in range(1 + budget) if live[i]}
        assert prefixes.get(budget - 1, set()) <= chosen
        prefixes[budget] = chosen


@settings(max_examples=80, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), W=st.integers(1, 3), D=st.integers(1, 3), vocab=st.integers(2, 4),
       min_prob=st.sampled_from([0.0, 0.2, 0.5, 0.9]))
def test_trim_keeps_each_rows_wanted_prefixes_and_nothing_false(seed, W, D, vocab, min_prob):
    """B = 2 rows with their own drafts and lookup proposals (which alias drafted nodes): after `trim`,
    each row's live nodes are exactly the prefixes it wants (live drafted nodes of p >= min_prob, the live
    lookup nodes) and their ancestors, each reached through its own parents."""
    rng = np.random.default_rng(seed)
    parents = rng.integers(0, W, (2, D, W)); parents[:, 0] = 0
    steps = -rng.exponential(1.0, (2, D, W))
    scores = np.zeros((2, D, W))
    for b in range(2):
        for d in range(D):
            scores[b, d] = (scores[b, d - 1, parents[b, d]] if d else 0) + steps[b, d]
    levels = DraftLevels(mx.array(rng.integers(0, vocab, (2, D, W))), mx.array(parents), mx.array(scores, dtype=mx.float32))
    budget = int(rng.integers(1, W * D + 1))
    tree = ranked_tree(levels, mx.array([0, 0]), mx.array(rng.integers(0, vocab, (2, D))), mx.array(rng.random(2) < 0.7), budget)
    cut = trim(tree, budget, min_prob)
    for b in range(2):
        before = _live_prefixes(tree, b)
        score = np.array(tree.score)[b]
        drafted = (np.arange(len(score)) >= 1) & (np.arange(len(score)) <= budget)
        wanted = {p for i, p in before.items() if not drafted[i] or min_prob == 0 or score[i] >= np.log(min_prob)}
        closed = {p[:k] for p in wanted for k in range(1, len(p) + 1)}
        assert set(_live_prefixes(cut, b).values()) == closed


def _live_prefixes(tree, b):
    tokens, parents, live = (np.array(x)[b] for x in (tree.tokens, tree.parents, tree.live))
    return {i: tuple(_prefix(i, tokens, parents)) for i in range(len(tokens)) if live[i]}


def _prefix(i, tokens, parents):
    out = [tokens[i]]
    while i:
        i = parents[i]
        out.append(tokens[i])
    return out[::-1]


def test_tree_targets_draw_on_the_walk_only_and_accept_as_draws_at_every_node():
    """Greedy: the argmax at every node. Sampled: draws only on the walk from the root, and the
    accepted outcome has the same distribution as with a draw at every node (chi-square)."""
    from scipy.stats import chi2_contingency

    from mlx_redrafter.draft_tree import tree_targets
    from mlx_redrafter.sampling import SamplingConfig

    tree = ranked_tree(example_levels(), mx.array([7]), mx.array([[3, 8]]), mx.array([True]), budget=3)
    rows = 20000
    tree = type(tree)(*(mx.broadcast_to(x, (rows,) + x.shape[1:]) for x in tree))
    mx.random.seed(0)
    # six nodes over a vocabulary of 10, concentrated on the drafted tokens so that walks go deep
    logits = mx.random.normal((1, 6, 10)) + 2.5 * mx.eye(10)[mx.array([3, 8, 1, 1, 2, 6])][None]
    logits = mx.broadcast_to(logits, (rows, 6, 10))
    greedy = SamplingConfig()
    assert mx.array_equal(tree_targets(tree, logits, greedy), logits.argmax(axis=-1))
    sampled = SamplingConfig(temperature=0.8)
    walked = tree_targets(tree, logits, sampled)
    every = tree_targets(tree, logits, sampled, walk=False)
    assert mx.array_equal(every >= 0, mx.ones_like(every, dtype=mx.bool_))
    outcomes = []
    for targets in (walked, every):
        result = accept(tree, targets)
        emitted = np.concatenate([np.array(result.tokens), np.array(result.count)[:, None], np.array(result.bonus)[:, None]], 1)
        outcomes.append([tuple(r[: r[-2] + 1]) + (r[-1],) for r in emitted])
    # off the walk nothing is drawn: a drawn node is the root or the child its parent's draw chose
    w = np.array(walked)
    drawn = w >= 0
    parents, tokens = np.array(tree.parents), np.array(tree.tokens)
    assert drawn[:, 0].all()
    chosen = np.take_along_axis(w, parents, 1) == tokens
    assert (~drawn[:, 1:] | chosen[:, 1:]).all() and drawn.sum() < drawn.size / 2
    kinds = sorted(set(outcomes[0]) | set(outcomes[1]))
    table = np.array([[o.count(k) for k in kinds] for o in outcomes])
    table = table[:, table.sum(0) >= 10]
    assert table.shape[1] > 5 and chi2_contingency(table).pvalue > 1e-3
