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
itself, as a loop would. It runs on the device, for every row at once, so the
step never waits for the host (tests/test_lookup.py holds a plain-Python
reference it is checked against).
"""

import mlx.core as mx


def propose_on_device(history: mx.array, lengths: mx.array, g0: mx.array, length: int, n_max: int = 4):
    """`ContextLookup.propose` for a batch, on the device, with fixed shapes.

    history (B, T): each row's committed tokens in [0, lengths[b]) (anything after is ignored);
    g0 (B,). Returns (proposal (B, length) int32, found (B,) bool); rows without a match
    propose garbage with found False.
    """
    B, T = history.shape
    n_max = min(n_max, T)
    end = mx.arange(T)[None]  # where an earlier occurrence of the suffix ends
    lengths = lengths[:, None]
    run = mx.ones((B, T), mx.bool_)
    matched = mx.zeros((B, T), mx.int32)
    for k in range(n_max):  # suffix token k back from g0 against history[end - k]
        tail = g0[:, None] if k == 0 else mx.take_along_axis(history, mx.maximum(lengths - k, 0), axis=1)
        shifted = mx.pad(history[:, : T - k], [(0, 0), (k, 0)], constant_values=-1) if k else history
        run = run & (shifted == tail) & (end >= k) & (lengths >= k)
        matched = mx.where(run, k + 1, matched)
    score = mx.where((end <= lengths - 2) & (matched > 0), matched * T + end, -1)
    start = mx.argmax(score, axis=1, keepdims=True).astype(mx.int32) + 1
    found = score.max(axis=1) >= 0
    span = mx.maximum(lengths - start + 1, 1)  # history[start:] + [g0], repeated past its end
    offset = mx.arange(length)[None] % span
    copied = mx.take_along_axis(history, mx.minimum(start + offset, T - 1), axis=1)
    return mx.where(offset == span - 1, g0[:, None], copied).astype(mx.int32), found
