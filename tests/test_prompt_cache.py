"""Prompt-cache reuse: a conversation continued from its cached prefix decodes exactly as from scratch;
the store keeps the most recent conversations and drops a cache a failed step may have left half written.
Stop strings are matched across token boundaries without sending any part of them."""

import pytest

from conftest import tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter import BeamShape, PromptCache, SamplingConfig, stream_generate
from mlx_redrafter.stopping import StopText

VOCAB = 32


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(tiny_config(vocab_size=VOCAB), scale=3.0)
    tok = word_tokenizer(VOCAB, eos=1)
    tok._eos_token_ids = set()
    return model, tok, tiny_drafter(model, "apple", scale=3.0)


def run(model, tok, drafter, prompt, cache=None, n=40):
    responses = list(stream_generate(model, tok, prompt, drafter=drafter, beam=BeamShape(2, 3), max_tokens=n,
                                     sampling=SamplingConfig(), prompt_cache=cache))
    return [r.token for r in responses], responses[0].cached_tokens


@pytest.mark.parametrize("speculative", [True, False])
def test_reused_cache_decodes_as_from_scratch(tiny, speculative):
    model, tok, drafter = tiny
    drafter = drafter if speculative else None
    cache, prompt = PromptCache(), [3, 4, 5, 6]
    for turn in range(3):  # each turn: the last prompt, its answer and a new message; 40 tokens pass compactions
        fresh, _ = run(model, tok, drafter, prompt)
        reused, cached = run(model, tok, drafter, prompt, cache)
        assert reused == fresh
        if turn:
            assert len(previous) <= cached < len(prompt)
        previous = prompt + fresh
        prompt = previous + [7 + turn, 8, 9]


def test_a_shorter_prompt_and_an_unrelated_one(tiny):
    model, tok, drafter = tiny
    cache = PromptCache()
    long_prompt = [3, 4, 5, 6, 7, 8, 9, 10]
    run(model, tok, drafter, long_prompt, cache)
    assert run(model, tok, drafter, long_prompt[:5], cache) == (run(model, tok, drafter, long_prompt[:5])[0], 4)
    assert run(model, tok, drafter, [11, 12], cache) == (run(model, tok, drafter, [11, 12])[0], 0)


def test_the_store_keeps_the_recent_conversations_and_picks_the_longest_match(tiny):
    model, tok, drafter = tiny
    cache = PromptCache(size=2)
    for first in (3, 4, 5):
        run(model, tok, drafter, [first, 6, 7, 8], cache, n=4)
    assert len(cache) == 2
    assert run(model, tok, drafter, [3, 6, 7, 8, 9], cache, n=4)[1] == 0  # the oldest went
    assert run(model, tok, drafter, [5, 6, 7, 8, 9], cache, n=4)[1] == 4


def test_a_failed_step_drops_its_cache(tiny):
    model, tok, _ = tiny
    cache = PromptCache()

    def steps():
        yield [2], 0
        raise RuntimeError("device lost")

    recorded = cache.record([3, 4], model.make_cache(), "k", steps())
    assert next(recorded) == ([2], 0) and len(cache) == 1
    with pytest.raises(RuntimeError):
        next(recorded)
    assert len(cache) == 0


def test_mlx_lm_prompt_caches_are_refused_with_what_to_pass(tiny):
    model, tok, _ = tiny
    with pytest.raises(TypeError, match="PromptCache"):
        list(stream_generate(model, tok, [3, 4], prompt_cache=[object()]))
    with pytest.raises(ValueError, match="at least one"):
        PromptCache(0)


def feed_all(stops, pieces):
    out = [stops.feed(p) for p in pieces]
    return out, stops.flush()


def test_stop_strings_across_token_boundaries_never_leak():
    out, rest = feed_all(StopText(["END"]), ["Hello E", "N", "D and more"])
    assert out == ["Hello ", "", ""] and rest == ""
    out, rest = feed_all(StopText(["END"]), ["Hello E", "N", "O"])  # a false start is sent once it is clear
    assert "".join(out) + rest == "Hello ENO" and out[:2] == ["Hello ", ""]
    out, rest = feed_all(StopText(["\n\n", "xyz", "yz!"]), ["a x", "y", "z! b"])  # the earliest match wins
    assert "".join(out) + rest == "a "
    out, rest = feed_all(StopText(["END"]), ["ends with EN"])  # held back text comes out at the end
    assert out == ["ends with "] and rest == "EN"
    assert feed_all(StopText([]), ["a", "b"]) == (["a", "b"], "")
