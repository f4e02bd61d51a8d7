"""Context lookup proposals and the extra beam they add."""

import numpy as np

from mlx_redrafter.lookup import ContextLookup, with_lookup_beam


def test_docstring_example():
    assert ContextLookup([5, 8, 9, 4, 1, 5, 8], n_max=2).propose(9, 3) == [4, 1, 5]


def test_longest_suffix_wins_and_latest_occurrence():
    lookup = ContextLookup([1, 2, 7, 3, 2, 8, 1, 2], n_max=3)
    assert lookup.propose(7, 2) == [3, 2]  # "1 2 7" beats the later "2" -> 8
    assert lookup.propose(2, 1) == [8]  # suffix "2 2"? no; "2" last seen before 8
    assert lookup.propose(9, 2) is None


def test_a_loop_is_continued_past_the_end():
    lookup = ContextLookup([4, 5, 6, 4, 5], n_max=2)
    assert lookup.propose(6, 5) == [4, 5, 6, 4, 5]


def test_extend_matches_building_at_once():
    tokens = list(np.random.default_rng(0).integers(0, 5, 40))
    grown = ContextLookup(tokens[:10])
    grown.extend(tokens[10:25])
    grown.extend(tokens[25:])
    whole = ContextLookup(tokens)
    assert grown.follows == whole.follows
    assert all(grown.propose(g, 4) == whole.propose(g, 4) for g in range(6))


def test_lookup_beam_row():
    beams = np.array([[9, 1, 2], [9, 3, 4]])
    assert with_lookup_beam(beams, None) is beams
    added = with_lookup_beam(beams, ContextLookup([7, 9, 5, 6]))
    assert added.tolist() == [[9, 1, 2], [9, 3, 4], [9, 5, 6]]
    # no match: the extra row repeats beam 0, which tree packing drops as a duplicate
    assert with_lookup_beam(beams, ContextLookup([7, 8])).tolist()[-1] == [9, 1, 2]
