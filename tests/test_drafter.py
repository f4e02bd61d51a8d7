"""The drafter: Apple's equations and key names, variants, save/load, mismatch checks; beam search."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import DRAFTER_VARIANTS, tiny_config, tiny_drafter, tiny_model
from mlx_redrafter.beam_search import BeamShape, beam_search, nn_log_softmax
from mlx_redrafter.drafter import load_drafter, save_drafter


@pytest.fixture(scope="module")
def base():
    return tiny_model(tiny_config(vocab_size=20))


def silu(x):
    return x / (1 + np.exp(-x))


def test_apple_equations_and_key_names(base):
    d = tiny_drafter(base, "apple")
    keys = {k for k, _ in tree_flatten(d.parameters())}
    assert keys == {"lm_head.0.linear.weight", "lm_head.0.linear.bias", "lm_head.1.linear.weight",
                    "lm_head.1.linear.bias", "lm_head.2.weight", "rnn_u.weight", "rnn_u.bias", "rnn_w.weight"}
    w = {k: np.array(v) for k, v in tree_flatten(d.parameters())}
    h = np.random.default_rng(0).normal(size=48).astype(np.float32)
    e1, e2 = np.array(base.embed(mx.array([3, 7])))
    s1 = silu(w["rnn_w.weight"] @ e1 + w["rnn_u.bias"])  # s_0 = 0
    s2 = silu(w["rnn_w.weight"] @ e2 + w["rnn_u.weight"] @ s1 + w["rnn_u.bias"])
    x = np.concatenate([h, s2])
    for i in range(2):
        x = x + silu(w[f"lm_head.{i}.linear.weight"] @ x + w[f"lm_head.{i}.linear.bias"])
    want = w["lm_head.2.weight"] @ x
    state = d.next_state(d.next_state(mx.zeros((48,)), mx.array(e1)), mx.array(e2))
    np.testing.assert_allclose(np.array(d(mx.array(h), state)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(DRAFTER_VARIANTS))
def test_save_load_round_trip(tmp_path, base, variant):
    d = tiny_drafter(base, variant)
    save_drafter(d, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary leftovers
    loaded = load_drafter(tmp_path / "d", base)
    h, s = mx.random.normal((48,)), mx.random.normal((3, 48))
    assert mx.array_equal(loaded(h, s, base), d(h, s, base))
    if variant == "reduced-vocab":
        assert mx.array_equal(loaded.draft_to_token, d.draft_to_token)
    save_drafter(loaded, tmp_path / "d")  # overwrite in place
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "recurrent_drafting_drafter"


def test_mismatched_base_is_refused(tmp_path, base):
    save_drafter(tiny_drafter(base), tmp_path / "d")
    other = tiny_model(tiny_config(vocab_size=24))
    with pytest.raises(ValueError, match="drafter does not match the base model.*vocab_size=20.*vocab_size=24"):
        load_drafter(tmp_path / "d", other)


def test_weights_not_matching_config_are_refused(tmp_path, base):
    save_drafter(tiny_drafter(base), tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "num_draft_layers": 3}))
    with pytest.raises(ValueError, match="do not match its config"):
        load_drafter(tmp_path / "d", base)


def test_missing_drafter(tmp_path):
    with pytest.raises(FileNotFoundError, match="no drafter at"):
        load_drafter(tmp_path / "none")


@pytest.mark.parametrize("variant", ["apple", "reduced-vocab"])
def test_beam_search_is_exhaustive_when_wide(base, variant):
    """With W >= Vd and Lb = 3, beam search must return the global top-W two-token drafts."""
    d = tiny_drafter(base, variant)
    vd = d.config.draft_vocab
    hidden, g0 = mx.random.normal((48,)), mx.array(5)
    tokens, logprobs = beam_search(d, base, hidden, g0, BeamShape(width=vd, length=3))
    assert (np.array(tokens[:, 0]) == 5).all()
    ids = np.array(d.to_token_ids(mx.arange(vd)))
    s1 = d.next_state(mx.zeros((48,)), base.embed(g0))
    lp1 = np.array(nn_log_softmax(d(hidden, s1)))
    scored = []
    for a, b in itertools.product(range(vd), range(vd)):
        s2 = d.next_state(s1, base.embed(mx.array(ids[a])))
        scored.append((lp1[a] + np.array(nn_log_softmax(d(hidden, s2)))[b], (5, ids[a], ids[b])))
    best = sorted(scored, key=lambda t: -t[0])[:vd]
    assert [tuple(r) for r in np.array(tokens).tolist()] == [b[1] for b in best]
    np.testing.assert_allclose(np.array(logprobs.sum(axis=1)), [b[0] for b in best], atol=1e-4)


@pytest.mark.parametrize("bits, smaller", [(8, 3), (4, 5)])
def test_quantized_storage_round_trip(tmp_path, bits, smaller):
    """8-bit (4-bit) storage: over 3x (5x) smaller than fp32, weights within one quantization step, ids exact."""
    from mlx_redrafter.drafter import DrafterConfig, init_drafter

    base = tiny_model(tiny_config(vocab_size=20, hidden_size=64))
    config = DrafterConfig(vocab_size=20, hidden_size=64, exit_dim=64, num_draft_layers=1, draft_vocab_size=12)
    d = init_drafter(config, base, mx.arange(12) + 8)
    save_drafter(d, tmp_path / "full")
    save_drafter(d, tmp_path / "q", bits=bits)
    size = lambda name: (tmp_path / name / "model.safetensors").stat().st_size  # noqa: E731
    assert size("q") * smaller < size("full")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": bits}
    loaded = load_drafter(tmp_path / "q", base)
    assert mx.array_equal(loaded.draft_to_token, d.draft_to_token)
    for (k, want), (_, got) in zip(tree_flatten(d.parameters()), tree_flatten(loaded.parameters())):
        if want.ndim == 2:
            step = (np.array(want).max(axis=1) - np.array(want).min(axis=1)) / (2**bits - 1)
            assert np.all(np.abs(np.array(got) - np.array(want)) <= step[:, None]), k
        else:
            assert mx.array_equal(got, want), k


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_drafter_path_is_refused_not_read_as_the_working_directory(empty, tmp_path, monkeypatch):
    """Path("") is ".": inside a train --out folder it would load ./drafter without a word."""
    import mlx_redrafter as mr
    from mlx_redrafter.serving import Worker

    base = tiny_model(tiny_config(vocab_size=20, hidden_size=64))
    save_drafter(tiny_drafter(base), tmp_path / "drafter")
    monkeypatch.chdir(tmp_path)
    for call in (lambda: load_drafter(empty, base), lambda: Worker(base, None, drafter=empty),
                 lambda: next(mr.stream_generate(base, None, [1, 2], drafter=empty))):
        with pytest.raises(ValueError, match="the drafter path is empty"):
            call()
