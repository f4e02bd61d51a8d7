"""Context lookup: one extra candidate beam copied from earlier in the context.

Models repeat what they have seen (names, code, phrases of the prompt, their
own earlier sentences), which a recurrent drafter, blind to the context
beyond the last hidden state, cannot know. Prompt lookup decoding proposes the
tokens that followed the latest earlier occurrence of the current suffix. The
proposal joins the drafter's beams in the verified tree; verification does not
care where a candidate comes from, so the output stays exactly the base
model's. Worked example, n_max = 2, Lb = 4:

    context [5 8 9 4 1 5 8], next token g0 = 9
    suffix [8 9] occurred at 1..2, followed by [4 1 5]  -> beam [9 4 1 5]

The longest suffix (n <= n_max tokens, g0 included) that occurred before wins,
its latest occurrence first; past the end of the context the copy repeats
itself, as a loop would. With K beams (`BeamShape.lookup_beams`) the next
occurrences in that order propose too, each copy unlike the ones before it
(in the example, K = 2: 9 occurred only once before, so the second beam is
not found; after [5 8 9 4 5 8 9 7 5 8], g0 = 9, it is [4 5 8] after [7 5 8]).
It runs on the device, for every row at once, so the step never waits for the
host (tests/test_lookup.py holds a plain-Python reference it is checked against).
"""

import mlx.core as mx


def propose_on_device(history: mx.array, lengths: mx.array, g0: mx.array, length: int, n_max: int = 4,
                      beams: int = 1):
    """`beams` context-lookup proposals for a batch, on the device, with fixed shapes.

    history (B, T): each row's committed tokens in [0, lengths[b]) (anything after is ignored);
    g0 (B,). Returns (proposals (B, beams, length) int32, found (B, beams) bool), best first;
    a proposal not found is garbage.
    """
    B, T = history.shape
    score = _match_scores(history, lengths[:, None], g0, min(n_max, T))
    start = mx.arange(T)[None] + 1  # a copy starts after the occurrence
    span = mx.maximum(lengths[:, None] - start + 1, 1)  # history[start:] + [g0], repeated past its end
    offset = mx.arange(length)[None, None] % span[:, :, None]  # (B, T, length)
    copied = mx.take_along_axis(history, mx.minimum(start[:, :, None] + offset, T - 1).reshape(B, -1), axis=1)
    copies = mx.where(offset == span[:, :, None] - 1, g0[:, None, None], copied.reshape(B, T, length))
    proposals, found = [], []
    for _ in range(beams):
        best = mx.argmax(score, axis=1).astype(mx.int32)
        copy = mx.take_along_axis(copies, best[:, None, None], axis=1)[:, 0]  # (B, length)
        proposals.append(copy)
        found.append(score.max(axis=1) >= 0)
        score = mx.where((copies == copy[:, None]).all(axis=-1), -1, score)  # the next one copies something else
    return mx.stack(proposals, axis=1).astype(mx.int32), mx.stack(found, axis=1)


def _match_scores(history: mx.array, lengths: mx.array, g0: mx.array, n_max: int) -> mx.array:
    """(B, T): for each end of an earlier occurrence of the context's suffix, matched length * T + end
    (longest first, then latest), -1 where none ends."""
    B, T = history.shape
    end = mx.arange(T)[None]
    run = mx.ones((B, T), mx.bool_)
    matched = mx.zeros((B, T), mx.int32)
    for k in range(n_max):  # suffix token k back from g0 against history[end - k]
        tail = g0[:, None] if k == 0 else mx.take_along_axis(history, mx.maximum(lengths - k, 0), axis=1)
        shifted = mx.pad(history[:, : T - k], [(0, 0), (k, 0)], constant_values=-1) if k else history
        run = run & (shifted == tail) & (end >= k) & (lengths >= k)
        matched = mx.where(run, k + 1, matched)
    return mx.where((end <= lengths - 2) & (matched > 0), matched * T + end, -1)
