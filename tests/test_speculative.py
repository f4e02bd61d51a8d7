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
from mlx_redrafter import decoding
from mlx_redrafter.decoding import Decoder
from mlx_redrafter.draft_tree import accept
from mlx_redrafter.sampling import target_probs

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
    tree=st.sampled_from(["ranked", "beams"]),
    nodes=st.integers(0, 12),
    lookup_length=st.sampled_from([0, 1, 3, 9]),
    min_prob=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    lookup_beams=st.sampled_from([1, 1, 2, 4]),
)
def test_greedy_equals_plain_greedy(base_seed, drafter_seed, variant, W, Lb, prompt, max_tokens, eos_at, lookup, tree, nodes,
                                    lookup_length, min_prob, lookup_beams):
    model = BASES[base_seed]
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    plain, _ = tokens_of(model, tok, prompt, max_tokens)
    if eos_at is not None and eos_at < len(plain):
        tok._eos_token_ids = {plain[eos_at]}  # EOS lands wherever it lands, mid-step too
        plain, _ = tokens_of(model, tok, prompt, max_tokens)
    drafter = tiny_drafter(model, variant, seed=drafter_seed, scale=3.0)
    shape = BeamShape(W, Lb, lookup, nodes, tree, lookup_length if lookup else 0, min_prob, lookup_beams if lookup else 1)
    spec, responses = tokens_of(model, tok, prompt, max_tokens, drafter, shape)
    assert spec == plain
    assert responses[-1].finish_reason == plain_reason(plain, tok, max_tokens)
    assert all(r.step_accepted <= shape.emit_length - 1 for r in responses)


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


def test_a_long_lookup_beam_accepts_past_the_drafters_depth():
    """Greedy output that loops is copied by the lookup beam, lookup_length tokens at a time (> Lb - 1)."""
    model = BASES[0]
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    plain, _ = tokens_of(model, tok, [1, 2, 3], 80)
    spec, rs = tokens_of(model, tok, [1, 2, 3], 80, tiny_drafter(model, "apple", seed=0, scale=3.0),
                         BeamShape(2, 3, lookup_length=8))
    assert spec == plain
    assert max(r.step_accepted for r in rs) == 8


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
ROWS = 100  # B = 1 is checked too (test_sampling_is_lossless_one_row_at_a_time)


def exact_joint(model, prompt, cfg):
    """P(t1, t2) of plain sampling, from the base model's filtered distributions."""
    p1 = np.array(target_probs(model.logits(model(mx.array([prompt])))[0, -1], cfg))
    rows = mx.array([prompt + [t] for t in range(SMALL)])
    p2 = np.array(target_probs(model.logits(model(rows))[:, -1], cfg))
    return p1[:, None] * p2


def biased_accept(tree, targets):
    """A rule that favours the drafter: when the base model's draw at the root is none of the
    drafted children, the drafter's top-ranked child (node 1) is taken instead of the draw."""
    children = tree.live & (tree.depth == 1)
    drafted = (children & (tree.tokens == targets[:, :1])).any(axis=1, keepdims=True)
    forced = mx.where(~drafted & (mx.arange(targets.shape[1]) == 0), tree.tokens[:, 1:2], targets)
    return accept(tree, forced)


def sample_pairs(model, drafter, prompt, cfg, compiled=False, shape=BeamShape(2, 3), rows=ROWS, samples=SAMPLES):
    """Counts of the first two tokens, from the real decoding loop (context lookup on), `samples` of
    them drawn `rows` at a time as rows of one batch (each row draws its own randomness)."""
    decoder = Decoder(model, drafter, shape, cfg, compiled=compiled)
    counts = np.zeros((SMALL, SMALL))
    for _ in range(samples // rows):
        tokens = [[] for _ in range(rows)]
        for step, _ in decoder.run([prompt] * rows):
            for row, emitted in zip(tokens, step):
                row += emitted
            if min(map(len, tokens)) >= 2:
                break
        for t in tokens:
            counts[t[0], t[1]] += 1
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


@pytest.mark.parametrize("cfg, compiled, shape", [(SamplingConfig(temperature=1.0), False, BeamShape(2, 3)),
                                                  (SamplingConfig(temperature=1.5, top_k=6, top_p=0.95), False, BeamShape(2, 3)),
                                                  (SamplingConfig(temperature=1.0), True, BeamShape(2, 3)),
                                                  (SamplingConfig(temperature=1.0), False, BeamShape(2, 3, lookup_length=5)),
                                                  (SamplingConfig(temperature=1.0), False, BeamShape(3, 3, min_prob=0.2)),
                                                  (SamplingConfig(temperature=1.0), True, BeamShape(2, 3, lookup_length=4, lookup_beams=3))])
def test_sampling_is_lossless(small, cfg, compiled, shape):
    """Also with the tree forward compiled (the GPU default), whose draws go through mx.random.state,
    with a lookup beam longer than the drafter's (a prompt that repeats, so that it matches), with
    the tree cut to the drafter's likelier nodes (a different tree each step), and with three lookup
    beams (a prompt whose suffix occurred before with different continuations)."""
    model, drafter = small
    prompt = [3, 1, 3, 2, 3, 0, 3, 1, 3] if shape.lookup_beams > 1 else [3, 1, 3, 1, 3, 1] if shape.lookup_length else [3, 1]
    mx.random.seed(11)
    probs = exact_joint(model, prompt, cfg)
    counts = sample_pairs(model, drafter, prompt, cfg, compiled, shape)
    assert chi_square_p(counts, probs) > 1e-3


def test_sampling_is_lossless_one_row_at_a_time(small):
    """The same at B = 1, where most users decode (fewer samples: a coarser check)."""
    model, drafter = small
    cfg = SamplingConfig(temperature=1.0)
    mx.random.seed(13)
    probs = exact_joint(model, [3, 1], cfg)
    counts = sample_pairs(model, drafter, [3, 1], cfg, rows=1, samples=600)
    assert counts.sum() == 600 and chi_square_p(counts, probs) > 1e-3


def test_biased_rule_is_detected(small, monkeypatch):
    """The same test catches a rule that favours the drafter (the loop calls `decoding.accept`)."""
    model, drafter = small
    cfg = SamplingConfig(temperature=1.0)
    mx.random.seed(12)
    probs = exact_joint(model, [3, 1], cfg)
    monkeypatch.setattr(decoding, "accept", biased_accept)
    counts = sample_pairs(model, drafter, [3, 1], cfg)
    assert chi_square_p(counts, probs) < 1e-6


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    drafter_seed=st.integers(0, 1000),
    variant=st.sampled_from(sorted(DRAFTER_VARIANTS)),
    W=st.integers(1, 4),
    Lb=st.integers(2, 5),
    prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9), min_size=2, max_size=2),
    lookup=st.booleans(),
    nodes=st.integers(0, 8),
    lookup_length=st.sampled_from([0, 6]),
    min_prob=st.sampled_from([0.0, 0.2]),
)
def test_two_rows_equal_plain_greedy(drafter_seed, variant, W, Lb, prompts, lookup, nodes, lookup_length, min_prob):
    """B = 2 rows of different prompt lengths in one batch-shaped step, each equal to plain greedy."""
    model = BASES[1]
    shape = BeamShape(W, Lb, lookup, nodes, lookup_length=lookup_length if lookup else 0, min_prob=min_prob)
    decoder = Decoder(model, tiny_drafter(model, variant, seed=drafter_seed, scale=3.0), shape, SamplingConfig())
    assert_rows_equal_plain(decoder, prompts, 16)


@pytest.mark.parametrize("variant, W, Lb, lookup, nodes", [("apple", 2, 4, True, 0), ("reduced-vocab", 3, 5, False, 6),
                                                         ("features", 2, 4, True, 0)])
def test_compiled_verify_equals_plain_greedy(variant, W, Lb, lookup, nodes):
    """The tree forward as one mx.compile'd graph (writing at a device-side slot) through span growth
    and compaction (slack 8), for two rows of different lengths."""
    model = BASES[1]
    drafter = tiny_drafter(model, variant, seed=3, scale=3.0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    counts = {}
    for compiled in (True, False):  # and the same drafts accepted as eager: what the drafter reads is routed alike
        decoder = Decoder(model, drafter, BeamShape(W, Lb, lookup, nodes), SamplingConfig(), slack=8, compiled=compiled)
        counts[compiled] = assert_rows_equal_plain(decoder, prompts, 60)
    assert counts[True] == counts[False]


def test_compiled_verify_drops_its_traces_past_the_bound(monkeypatch):
    """With the CPU's cut (a row count per step) and at most 3 traces kept, the decoder rebuilds its
    compiled verify as shapes pile up, and the output still equals plain greedy."""
    monkeypatch.setattr(decoding, "MAX_TRACES", 3)
    model = BASES[1]
    decoder = Decoder(model, tiny_drafter(model, "apple", seed=3, scale=3.0), BeamShape(3, 4, True, min_prob=0.2),
                      SamplingConfig(), slack=8)
    first = decoder._verify
    assert_rows_equal_plain(decoder, [[1, 2, 3]], 60)
    assert decoder._verify is not first and len(decoder._traced) <= 3


def assert_rows_equal_plain(decoder, prompts, n):
    """The decoder's first n tokens of every row equal plain greedy decoding of that row's prompt."""
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    plain = [tokens_of(decoder.model, tok, p, n)[0] for p in prompts]
    rows, counts = [[] for _ in prompts], []
    for step, accepted in decoder.run(prompts):
        counts.append(accepted)
        for row, new in zip(rows, step):
            row += new
        if min(len(r) for r in rows) >= n:
            break
    assert [r[:n] for r in rows] == plain
    return counts


def test_a_lookup_length_needs_the_lookup_beam():
    with pytest.raises(ValueError, match="needs the context-lookup beam"):
        BeamShape(4, 4, lookup=False, lookup_length=8)
    assert BeamShape(4, 4, lookup_length=8).emit_length == 9 and BeamShape(4, 6, lookup_length=3).emit_length == 6
    assert BeamShape(4, 4, lookup=False).lookup_depth == 3


def test_lookup_beams_need_the_lookup_and_count_their_nodes():
    with pytest.raises(ValueError, match="lookup beams need the context lookup"):
        BeamShape(4, 4, lookup=False, lookup_beams=2)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="lookup beams must be in 1..8"):
            BeamShape(4, 4, lookup_beams=bad)
    assert BeamShape(4, 4, lookup_beams=3, lookup_length=5).lookup_nodes == 15
    assert BeamShape(4, 4, lookup=False).lookup_nodes == 3
