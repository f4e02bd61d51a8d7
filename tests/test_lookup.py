"""Context lookup on the device, checked against a plain-Python reference (the rule as written)."""

from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from hypothesis import given, settings, strategies as st

from mlx_redrafter.lookup import propose_on_device


class ContextLookup:
    def __init__(self, tokens: Sequence[int] = (), n_max: int = 4):
        self.n_max = n_max
        self.tokens: List[int] = []
        self.follows: Dict[Tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, new: Sequence[int]):
        for token in new:
            i = len(self.tokens)
            for n in range(1, min(self.n_max, i) + 1):
                self.follows[tuple(self.tokens[i - n:i])] = i
            self.tokens.append(token)

    def propose(self, g0: int, length: int) -> Optional[List[int]]:
        """`length` tokens to follow context + [g0], or None when no suffix of it occurred before."""
        tail = self.tokens[-(self.n_max - 1):] + [g0] if self.n_max > 1 else [g0]
        for n in range(min(self.n_max, len(tail)), 0, -1):
            start = self.follows.get(tuple(tail[-n:]))
            if start is not None:
                # past the end of the context the copy repeats itself, as a loop would
                seen = self.tokens[start:] + [g0]
                return [seen[k % len(seen)] for k in range(length)]
        return None

    def propose_beams(self, g0: int, length: int, beams: int) -> List[Optional[List[int]]]:
        """Up to `beams` copies, unlike each other: every earlier occurrence of a suffix, longest then
        latest first (None for each beam left over)."""
        tail = self.tokens[-(self.n_max - 1):] + [g0] if self.n_max > 1 else [g0]
        ends = []
        for end in range(len(self.tokens) - 1):  # an occurrence ending here, with a token after it
            n = 0
            while n < len(tail) and end - n >= 0 and self.tokens[end - n] == tail[-1 - n]:
                n += 1
            if n:
                ends.append((n, end))
        copies: List[Optional[List[int]]] = []
        for _, end in sorted(ends, reverse=True):
            seen = self.tokens[end + 1:] + [g0]
            copy = [seen[k % len(seen)] for k in range(length)]
            if copy not in copies and len(copies) < beams:
                copies.append(copy)
        return copies + [None] * (beams - len(copies))


def device_propose(rows, g0s, length, n_max=4, width=64, beams=None):
    """One proposal per row (None: not found), or `beams` of them."""
    history = np.full((len(rows), width), 3)
    for b, row in enumerate(rows):
        history[b, : len(row)] = row
    proposal, found = propose_on_device(mx.array(history), mx.array([len(r) for r in rows]), mx.array(g0s), length,
                                        n_max, beams=beams or 1)
    rows = [[p if f else None for p, f in zip(ps, fs)] for ps, fs in zip(np.array(proposal).tolist(), np.array(found).tolist())]
    return rows if beams else [r[0] for r in rows]


def test_docstring_example():
    assert ContextLookup([5, 8, 9, 4, 1, 5, 8], n_max=2).propose(9, 3) == [4, 1, 5]
    assert device_propose([[5, 8, 9, 4, 1, 5, 8]], [9], 3, n_max=2) == [[4, 1, 5]]


def test_longest_suffix_wins_and_latest_occurrence():
    lookup = ContextLookup([1, 2, 7, 3, 2, 8, 1, 2], n_max=3)
    assert lookup.propose(7, 2) == [3, 2]  # "1 2 7" beats the later "2" -> 8
    assert lookup.propose(2, 1) == [8]  # suffix "2 2"? no; "2" last seen before 8
    assert lookup.propose(9, 2) is None
    assert device_propose([[1, 2, 7, 3, 2, 8, 1, 2]] * 3, [7, 2, 9], 2, n_max=3) == [[3, 2], [8, 1], None]


def test_a_loop_is_continued_past_the_end():
    assert ContextLookup([4, 5, 6, 4, 5], n_max=2).propose(6, 5) == [4, 5, 6, 4, 5]
    assert device_propose([[4, 5, 6, 4, 5]], [6], 5, n_max=2) == [[4, 5, 6, 4, 5]]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.lists(st.lists(st.integers(0, 4), max_size=30), min_size=1, max_size=3),
       g0=st.integers(0, 4), length=st.integers(1, 7), n_max=st.integers(1, 4))
def test_device_equals_reference(rows, g0, length, n_max):
    """Rows of different lengths at once, anything after a row's length ignored."""
    expected = [ContextLookup(r, n_max).propose(g0, length) for r in rows]
    assert device_propose(rows, [g0] * len(rows), length, n_max) == expected


def test_more_beams_copy_other_occurrences():
    """The docstring's second example: the latest occurrence first, then the earlier one; a copy equal
    to one already proposed is skipped."""
    context = [5, 8, 9, 4, 5, 8, 9, 7, 5, 8]
    assert ContextLookup(context, n_max=2).propose_beams(9, 3, 3) == [[7, 5, 8], [4, 5, 8], None]
    assert device_propose([context], [9], 3, n_max=2, beams=3) == [[[7, 5, 8], [4, 5, 8], None]]
    assert device_propose([[1, 2, 1, 2, 1]], [2], 2, n_max=2, beams=2) == [[[1, 2], None]]  # every copy the same


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.lists(st.lists(st.integers(0, 3), max_size=30), min_size=1, max_size=3),
       g0=st.integers(0, 3), length=st.integers(1, 5), n_max=st.integers(1, 4), beams=st.integers(1, 4))
def test_device_beams_equal_reference(rows, g0, length, n_max, beams):
    expected = [ContextLookup(r, n_max).propose_beams(g0, length, beams) for r in rows]
    assert device_propose(rows, [g0] * len(rows), length, n_max, beams=beams) == expected
    assert [b[0] for b in expected] == [ContextLookup(r, n_max).propose(g0, length) for r in rows]
