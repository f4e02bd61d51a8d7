"""`tune`: measured choice stored per machine, model and drafter, and used by default."""

import json

import pytest

from conftest import tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter.generate import chosen_shape, stream_generate
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.tune import Tuned, first_use_notice, load_tuned, save_tuned, settings_path, tune

VOCAB = 16


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    model = tiny_model(tiny_config(vocab_size=VOCAB), seed=0, scale=4.0)
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    return model, tok, tiny_drafter(model, "apple", seed=3, scale=3.0)


def test_tune_measures_every_setting_and_round_trips(setup):
    model, tok, drafter = setup
    tuned = tune(model, tok, drafter, candidates=[(2, 3, 0), (1, 2, 0, 4), (2, 3, 0, 0, 0.2)], prompts=["t1 t2 t3"],
                 max_tokens=8, finalists=1, progress=False)
    assert [r["setting"] for r in tuned.rows] == ["plain", "2x3:0", "1x2:0+4", "2x3:0@0.2"]
    assert all(r["greedy_tps"] > 0 for r in tuned.rows)
    assert sum(r["sampled_tps"] is not None for r in tuned.rows) == 2  # plain + one finalist
    assert tuned.greedy in (None, BeamShape(2, 3, True, 0), BeamShape(1, 2, True, 0, lookup_length=4),
                            BeamShape(2, 3, True, 0, min_prob=0.2))
    path = save_tuned(model, drafter, tuned)
    assert path == settings_path(model, drafter) and load_tuned(model, drafter) == tuned


def test_stored_choice_is_used_by_default(setup, monkeypatch):
    model, tok, drafter = setup
    save_tuned(model, drafter, Tuned(BeamShape(3, 4, False, 5), None, "here"))
    assert chosen_shape(model, drafter, SamplingConfig()) == BeamShape(3, 4, False, 5)
    assert chosen_shape(model, drafter, SamplingConfig(temperature=0.7)) is None  # plain measured faster
    sampled = list(stream_generate(model, tok, [1, 2, 3], drafter=drafter, max_tokens=12, temp=0.7))
    assert sampled[-1].steps == 12  # decoded plainly: one token per step
    other = tiny_drafter(model, "apple", seed=4, scale=3.0)
    assert load_tuned(model, other) is None  # keyed by drafter too


def test_damaged_file_falls_back_and_notice_is_shown_once(setup):
    model, tok, drafter = setup
    assert first_use_notice(model, drafter) is not None
    assert first_use_notice(model, drafter) is None
    path = settings_path(model, drafter)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"greedy": {"width": "x"}}))
    assert load_tuned(model, drafter) is None
    assert chosen_shape(model, drafter, SamplingConfig()) is not None  # the built-in default
