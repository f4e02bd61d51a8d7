"""Speculative decoding is lossless: greedy output equals plain greedy output, token for token,
and sampled output has the base model's distribution (and a biased rule is caught)."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import chisquare

from conftest import DRAFTER_VARIANTS, tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter import SamplingConfig, stream_generate
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.sampling import choose_tokens, target_probs
from mlx_redrafter.speculative import speculative_steps

VOCAB = 16
BASES = {seed: tiny_model(tiny_config(vocab_size=VOCAB), seed=seed, scale=4.0) for seed in range(3)}


def tokens_of(model, tok, prompt, max_tokens, drafter=None, shape=None, sampling=None):
    rs = list(stream_generate(model, tok, prompt, drafter=drafter, beam=shape, max_tokens=max_tokens, sampling=sampling))
    return [r.token for r in rs], rs


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    base_seed=st.sampled_from(sorted(BASES)),
    drafter_seed=st.integers(0, 1000),
    variant=st.sampled_from(sorted(DRAFTER_VARIANTS)),
    W=st.integers(1, 4),
    Lb=st.integers(2, 5),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    max_tokens=st.integers(1, 30),
    eos_at=st.one_of(st.none(), st.integers(0, 29)),
    lookup=st.booleans(),
)
def test_greedy_equals_plain_greedy(base_seed, drafter_seed, variant, W, Lb, prompt, max_tokens, eos_at, lookup):
    model = BASES[base_seed]
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    plain, _ = tokens_of(model, tok, prompt, max_tokens)
    if eos_at is not None and eos_at < len(plain):
        tok._eos_token_ids = {plain[eos_at]}  # EOS lands wherever it lands, mid-step too
        plain, _ = tokens_of(model, tok, prompt, max_tokens)
    drafter = tiny_drafter(model, variant, seed=drafter_seed, scale=3.0)
    spec, responses = tokens_of(model, tok, prompt, max_tokens, drafter, BeamShape(W, Lb, lookup))
    assert spec == plain
    assert responses[-1].finish_reason == plain_reason(plain, tok, max_tokens)
    assert all(r.step_accepted <= Lb - 1 for r in responses)


def plain_reason(tokens, tok, max_tokens):
    return "stop" if tokens[-1] in tok._eos_token_ids else "length"


def test_drafts_are_accepted_and_flagged():
    """With a drafter that often agrees, steps accept several tokens and still match plain greedy."""
    model = BASES[0]
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    plain, _ = tokens_of(model, tok, [1, 2, 3], 60)
    accepted_total = 0
    for seed in range(6):
        spec, rs = tokens_of(model, tok, [1, 2, 3], 60, tiny_drafter(model, "apple", seed=seed, scale=3.0), BeamShape(4, 4))
        assert spec == plain
        accepted_total += sum(r.from_draft for r in rs)
        assert all(r.from_draft == (i > 0 and r.steps == rs[i - 1].steps) for i, r in enumerate(rs))
    assert accepted_total > 0


def test_default_model_greedy_with_a_random_drafter(default_model):
    model, tok, _ = default_model
    from mlx_redrafter.drafter import DrafterConfig, init_drafter

    mx.random.seed(0)
    drafter = init_drafter(DrafterConfig(vocab_size=49152, hidden_size=576, exit_dim=576, num_draft_layers=1,
                                         shared_lm_head=True), model)
    prompt = "Name three colors."
    plain, _ = tokens_of(model, tok, prompt, 24)
    spec, _ = tokens_of(model, tok, prompt, 24, drafter, BeamShape(3, 4))
    assert spec == plain


# ---- sampling: chi-square on the joint distribution of the first two tokens ----

SMALL = 8
SAMPLES = 3000


def exact_joint(model, prompt, cfg):
    """P(t1, t2) of plain sampling, from the base model's filtered distributions."""
    p1 = np.array(target_probs(model.logits(model(mx.array([prompt])))[0, -1], cfg))
    rows = mx.array([prompt + [t] for t in range(SMALL)])
    p2 = np.array(target_probs(model.logits(model(rows))[:, -1], cfg))
    return p1[:, None] * p2


def biased_acceptance(beams, node_of, logits, draft_logprobs, sampling):
    """Apple-style: accept a drafted token with min(1, p/q), keep the best beam, resample from p."""
    p = target_probs(logits, sampling)
    parents = node_of[:, :-1]
    p_token = mx.take_along_axis(p[parents], beams[:, 1:, None], axis=-1)[..., 0]
    ok = mx.random.uniform(shape=p_token.shape) < p_token / mx.exp(draft_logprobs)
    accepted = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
    best = mx.argmax(accepted)
    a = accepted[best]
    return best, a, choose_tokens(logits[node_of[best, a]], sampling)


def sample_pairs(model, drafter, prompt, cfg, acceptance=None):
    """Counts of the first two tokens; the context-lookup beam is on, except for the Apple-style
    rule, which needs the drafter's probability of every candidate."""
    kwargs = {} if acceptance is None else {"acceptance": acceptance}
    shape = BeamShape(2, 3, lookup=acceptance is None)
    counts = np.zeros((SMALL, SMALL))
    for _ in range(SAMPLES):
        tokens = []
        for step, _ in speculative_steps(model, drafter, prompt, cfg, shape, **kwargs):
            tokens += step
            if len(tokens) >= 2:
                break
        counts[tokens[0], tokens[1]] += 1
    return counts


def chi_square_p(counts, probs):
    keep = probs.ravel() > 0
    assert keep.sum() >= 8, "the test needs a spread-out distribution"
    assert counts.ravel()[~keep].sum() == 0, "sampled a token the filters exclude"
    expected = probs.ravel()[keep] * counts.sum()
    return chisquare(counts.ravel()[keep], expected / expected.sum() * counts.sum()).pvalue


@pytest.fixture(scope="module")
def small():
    model = tiny_model(tiny_config(vocab_size=SMALL), seed=5, scale=1.5)
    return model, tiny_drafter(model, "apple", seed=2, scale=8.0)


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.5, top_k=6, top_p=0.95)])
def test_sampling_is_lossless(small, cfg):
    model, drafter = small
    mx.random.seed(11)
    probs = exact_joint(model, [3, 1], cfg)
    counts = sample_pairs(model, drafter, [3, 1], cfg)
    assert chi_square_p(counts, probs) > 1e-3


def test_biased_rule_is_detected(small):
    model, drafter = small
    cfg = SamplingConfig(temperature=1.0)
    mx.random.seed(12)
    probs = exact_joint(model, [3, 1], cfg)
    counts = sample_pairs(model, drafter, [3, 1], cfg, acceptance=biased_acceptance)
    assert chi_square_p(counts, probs) < 1e-6
