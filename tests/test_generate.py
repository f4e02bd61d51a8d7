"""Plain decoding: greedy equals a hand-written argmax loop, EOS and max tokens, sampling settings."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config, tiny_model, word_tokenizer
from mlx_redrafter import SamplingConfig, stream_generate
from mlx_redrafter.sampling import choose_tokens, target_probs

VOCAB = 32


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(tiny_config(vocab_size=VOCAB), scale=3.0), word_tokenizer(VOCAB, eos=1)


def argmax_loop(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(model.logits(model(mx.array([tokens])))[0, -1].argmax().item())
    return tokens[len(prompt):]


def test_greedy_equals_uncached_argmax(tiny):
    model, tok = tiny
    tok._eos_token_ids = set()
    got = [r.token for r in stream_generate(model, tok, [3, 4, 5], max_tokens=20)]
    assert got == argmax_loop(model, [3, 4, 5], 20)


def test_stops_at_eos_and_max_tokens(tiny):
    model, tok = tiny
    tok._eos_token_ids = set()
    free = [r.token for r in stream_generate(model, tok, [7, 8], max_tokens=12)]
    tok._eos_token_ids = {free[4]}
    stopped = list(stream_generate(model, tok, [7, 8], max_tokens=12))
    first = free.index(free[4])
    assert [r.token for r in stopped] == free[: first + 1]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].text == ""
    tok._eos_token_ids = set()
    short = list(stream_generate(model, tok, [7, 8], max_tokens=5))
    assert len(short) == 5 and short[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    tok._eos_token_ids = set()
    cfg = SamplingConfig(temperature=1.0, seed=7)
    runs = [[r.token for r in stream_generate(model, tok, [2], max_tokens=16, sampling=cfg)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_top_k_one_is_greedy(tiny):
    model, tok = tiny
    tok._eos_token_ids = set()
    greedy = [r.token for r in stream_generate(model, tok, [9], max_tokens=10)]
    topk = [r.token for r in stream_generate(model, tok, [9], max_tokens=10,
                                             sampling=SamplingConfig(temperature=0.8, top_k=1, seed=1))]
    assert greedy == topk


def test_filters_keep_the_right_tokens():
    logits = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(np.array(p[0]), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_k=3))
    np.testing.assert_allclose(np.array(p[0]), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    p = target_probs(logits, SamplingConfig(temperature=0.5))
    want = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(np.array(p[0]), want / want.sum(), atol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    mx.random.seed(3)
    logits = mx.log(mx.array([0.4, 0.3, 0.2, 0.1]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.75)
    draws = np.array(choose_tokens(mx.broadcast_to(logits, (20000, 4)), cfg))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0], atol=0.015)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_settings(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_one_decoder_serves_every_seed_and_each_seed_still_decides_the_draws():
    """Sampled calls that differ only in seed reuse one Decoder (no new traces), and a seed's output
    is the same whichever seeds ran in between; settings that change the graphs get their own."""
    from conftest import tiny_drafter, word_tokenizer
    from mlx_redrafter.beam_search import BeamShape
    from mlx_redrafter.generate import MAX_DECODERS, decoder_for

    model = tiny_model(tiny_config(vocab_size=64), scale=2.0)
    drafter, tok = tiny_drafter(model, "apple", seed=1, scale=3.0), word_tokenizer(64)
    shape = BeamShape(4, 4)
    draw = lambda seed: [r.token for r in stream_generate(  # noqa: E731
        model, tok, [1, 2, 3], drafter=drafter, beam=shape, max_tokens=16, sampling=SamplingConfig(temperature=1.0, seed=seed))]
    first = draw(0)
    others = [draw(seed) for seed in (1, 2, 3)]
    assert draw(0) == first and any(o != first for o in others)
    assert len(model._decoders) == 1
    assert decoder_for(model, drafter, shape, SamplingConfig(temperature=0.5, seed=0)) is not \
        decoder_for(model, drafter, shape, SamplingConfig(temperature=1.0, seed=9))
    for width in range(1, MAX_DECODERS + 3):
        decoder_for(model, drafter, BeamShape(width, 3), SamplingConfig())
    assert len(model._decoders) == MAX_DECODERS


def test_reused_decoders_see_updated_weights_and_go_with_their_model():
    """generate reuses a Decoder per (model, drafter, settings); a drafter updated in place is seen,
    and a dropped model is freed with its decoders."""
    import gc
    import weakref

    from conftest import tiny_drafter
    from mlx_redrafter.beam_search import BeamShape
    from mlx_redrafter.generate import decoder_for

    model = tiny_model(tiny_config(vocab_size=64))
    a, b = tiny_drafter(model, "apple", seed=1, scale=3.0), tiny_drafter(model, "apple", seed=2, scale=3.0)
    shape, greedy = BeamShape(4, 4), SamplingConfig()

    def tree_of(drafter):
        decoder = decoder_for(model, drafter, shape, greedy)
        return decoder, decoder.draft(decoder.prefill([[1, 2, 3]])).tokens.tolist()

    first, before = tree_of(a)
    a.update(b.parameters())
    again, after = tree_of(a)
    assert again is first and after == tree_of(b)[1] and after != before
    alive = weakref.ref(model)
    del model, first, again
    gc.collect()
    assert alive() is None
