"""Numbers at their limits: temperatures too small to sample with, and the model's context window."""

import math
import re

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from conftest import tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter import SamplingConfig, generate, stream_generate
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.generate import context_window, encode_prompts, fit_context
from mlx_redrafter.sampling import MIN_TEMPERATURE, choose_tokens, filtered_logits

VOCAB = 16
LIMIT = 24


@pytest.fixture(scope="module")
def pair():
    model = tiny_model(tiny_config(vocab_size=VOCAB, max_position_embeddings=LIMIT), seed=0, scale=4.0)
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    return model, tok, tiny_drafter(model, "apple", seed=3, scale=3.0)


def tokens(model, tok, prompt, drafter=None, **kw):
    rs = list(stream_generate(model, tok, prompt, drafter=drafter, beam=BeamShape(3, 4, False), **kw))
    return [r.token for r in rs], rs


# Temperature


@pytest.mark.parametrize("t", [1e-45, 1e-38, 1e-30, 1e-10, MIN_TEMPERATURE / 2])
def test_temperatures_below_the_floor_are_greedy(t):
    assert SamplingConfig(temperature=t).greedy
    logits = mx.array([[0.0, 31.6, -40.0, 31.5]])
    assert choose_tokens(logits, SamplingConfig(temperature=t)).item() == 1


def test_the_floor_is_far_from_float32_overflow():
    """At the floor itself, logits / T stay finite for any logit a model produces (|l| < 1e30)."""
    assert not SamplingConfig(temperature=MIN_TEMPERATURE).greedy
    logits = mx.array([[1e4, -1e4, 0.0, 30.0]])
    assert mx.isfinite(filtered_logits(logits, SamplingConfig(temperature=MIN_TEMPERATURE))).all().item()
    kept = filtered_logits(logits, SamplingConfig(temperature=MIN_TEMPERATURE, top_p=0.5))
    assert not mx.isnan(kept).any().item() and mx.isfinite(kept[0, 0]).item()  # the rest filtered to -inf
    assert 1e30 / MIN_TEMPERATURE < 3.4e38  # float32's largest finite value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.7", None, True])
def test_non_finite_or_non_numeric_settings_are_refused(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingConfig(temperature=bad)
    with pytest.raises(ValueError, match="top-p must be a finite number"):
        SamplingConfig(top_p=bad)


def test_top_k_must_be_an_integer():
    with pytest.raises(ValueError, match="top-k must be an integer"):
        SamplingConfig(top_k=2.5)


@pytest.mark.parametrize("t", [1e-45, 1e-30, 1e-6])
def test_plain_and_speculative_agree_with_greedy_at_tiny_temperatures(pair, t):
    model, tok, drafter = pair
    prompt = [3, 5, 7]
    greedy, _ = tokens(model, tok, prompt, max_tokens=12)
    sampling = SamplingConfig(temperature=t, seed=1)
    plain, _ = tokens(model, tok, prompt, max_tokens=12, sampling=sampling)
    spec, _ = tokens(model, tok, prompt, drafter, max_tokens=12, sampling=sampling)
    assert plain == spec == greedy


# Context window


def test_context_window_reads_the_config(pair):
    model, _, _ = pair
    assert context_window(model) == LIMIT
    unlimited = tiny_model(tiny_config(vocab_size=VOCAB, max_position_embeddings=None))
    assert context_window(unlimited) is None
    for bad in (0, -5, "8192", True, 1.5):
        unlimited.args.max_position_embeddings = bad
        assert context_window(unlimited) is None  # not a usable limit: none enforced


def test_fit_context_rules():
    assert fit_context([1] * 10, 100, None) == ([1] * 10, 100)
    assert fit_context([1] * 10, 100, 24) == ([1] * 10, 14)
    assert fit_context(list(range(30)), 5, 24, keep_last=20) == (list(range(10, 30)), 4)
    assert fit_context([1, 2], 5, 24, keep_last=20) == ([1, 2], 5)
    with pytest.raises(ValueError, match="the prompt is 24 tokens, and the model's context window is 24"):
        fit_context([1] * 24, 5, 24)  # no room for one new token
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="keep_last"):
            fit_context([1] * 5, 5, 24, keep_last=bad)


@pytest.mark.parametrize("speculative", [False, True])
def test_long_prompt_is_refused_before_any_work(pair, speculative, monkeypatch):
    model, tok, drafter = pair
    monkeypatch.setattr(type(model), "__call__", lambda *a, **k: pytest.fail("the model ran on a prompt that does not fit"))
    with pytest.raises(ValueError) as e:
        tokens(model, tok, [3] * 40, drafter if speculative else None, max_tokens=4)
    message = str(e.value)
    assert "\n" not in message and "40 tokens" in message and f"context window is {LIMIT}" in message
    assert "--keep-last" in message


def test_eval_benchmark_and_tune_refuse_a_prompt_over_the_window_before_decoding(pair, monkeypatch):
    """eval-drafter, benchmark and tune run many prompts: one too long is named before any work (it
    once ran unbounded, or crashed MLX with a 3 MB prompt)."""
    from mlx_redrafter import evaluate, speed, tune

    model, tok, drafter = pair
    fits, long = "t3 t4", " ".join(["t5"] * 30)
    assert encode_prompts(model, tok, [fits], 4) == [[3, 4]]
    with pytest.raises(ValueError, match=f"prompt 2 is 30 tokens: with 4 new tokens it does not fit .* of {LIMIT}"):
        encode_prompts(model, tok, [fits, long], 4)
    with pytest.raises(ValueError, match="prompt 1 is 2 tokens: with 23 new tokens"):
        encode_prompts(model, tok, [fits], 23)
    with pytest.raises(ValueError, match=f"prompt 1 is over {LIMIT} tokens"):  # not tokenized in full
        encode_prompts(model, tok, ["t5 " * 100_000], 4)
    monkeypatch.setattr(evaluate, "batch_generate", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ValueError, match="prompt 2"):
        evaluate.greedy_references(model, tok, [fits, long], 4, progress=False)
    with pytest.raises(ValueError, match="prompt 2"):
        speed.run_benchmark(model, tok, None, drafter, [fits, long], 4, BeamShape(3, 4, False), progress=False)
    with pytest.raises(ValueError, match="prompt 2"):
        tune.tune(model, tok, drafter, prompts=[fits, long], max_tokens=4, progress=False)


@pytest.mark.parametrize("speculative", [False, True])
def test_keep_last_and_stop_at_the_window(pair, speculative):
    model, tok, drafter = pair
    prompt = list(range(2, 16)) * 3  # 42 tokens
    out, rs = tokens(model, tok, prompt, drafter if speculative else None, max_tokens=100, keep_last=20)
    assert len(out) == LIMIT - 20 and rs[-1].finish_reason == "length"
    assert rs[-1].prompt_tokens == 20 and rs[-1].prompt_tokens + rs[-1].generation_tokens == LIMIT
    plain, _ = tokens(model, tok, prompt[-20:], max_tokens=100)
    assert out == plain  # the speculative tree reaching past the window changes nothing emitted


def test_api_generate_takes_keep_last(pair):
    model, tok, _ = pair
    assert generate(model, tok, [3] * 40, max_tokens=2, keep_last=8)
    with pytest.raises(ValueError, match="context window"):
        generate(model, tok, [3] * 40, max_tokens=2)


def test_cli_refuses_then_keeps_last_with_a_note(tmp_path):
    from test_loading import write_model_dir
    from mlx_redrafter.cli import app

    config = tiny_config(vocab_size=64, max_position_embeddings=16)
    path = write_model_dir(tmp_path / "m", tiny_model(config), config)
    prompt = " ".join(f"t{i % 60 + 2}" for i in range(30))
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "-p", prompt, "-m", str(path), "--no-chat-template", "-n", "5", "--autoregressive"])
    assert r.exit_code == 2, r.output
    [line] = r.output.strip().splitlines()
    assert re.fullmatch(r"error: the prompt is \d+ tokens, and the model's context window is 16 .*--keep-last N.*", line)
    r = runner.invoke(app, ["generate", "-p", prompt, "-m", str(path), "--no-chat-template", "-n", "50",
                            "--keep-last", "10", "--autoregressive"])
    assert r.exit_code == 0, r.output
    assert "note: stopped at the model's context window (16 tokens: 10 of prompt, 6 generated)" in r.output
    assert "Generation: 6 tokens" in r.output
