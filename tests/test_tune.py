"""`tune`: measured choice stored per machine, model and drafter, and used by default."""

import importlib
import json

import pytest

from conftest import tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter.generate import chosen_shape, stream_generate
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter import backend
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.tune import (Tuned, first_use_notice, format_table, load_tuned, save_tuned, settings_path, tune,
                                writable_settings_path)

VOCAB = 16


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    model = tiny_model(tiny_config(vocab_size=VOCAB), seed=0, scale=4.0)
    tok = word_tokenizer(VOCAB)
    tok._eos_token_ids = set()
    return model, tok, tiny_drafter(model, "apple", seed=3, scale=3.0)


@pytest.fixture
def on_cpu(monkeypatch):
    """tune's CPU policy (no sampled warm-up, plain measured greedy only), whichever device runs the tests."""
    monkeypatch.setattr(backend, "on_gpu", lambda: False)


def test_tune_measures_every_setting_and_round_trips(setup, on_cpu):
    model, tok, drafter = setup
    tuned = tune(model, tok, drafter, candidates=[(2, 3, 0), (1, 2, 0, 4), (2, 3, 0, 0, 0.2)], prompts=["t1 t2 t3"],
                 max_tokens=8, finalists=1, seconds=0.2, progress=False)
    assert [r["setting"] for r in tuned.rows] == ["plain", "2x3:0", "1x2:0+4", "2x3:0@0.2"]
    assert all(r["greedy_tps"] > 0 for r in tuned.rows)
    assert [r["sampled_tps"] is not None for r in tuned.rows].count(True) == 1  # one finalist (plain: greedy only)
    assert "compared with plain greedy" in format_table(tuned)
    assert tuned.greedy in (None, BeamShape(2, 3, True, 0), BeamShape(1, 2, True, 0, lookup_length=4),
                            BeamShape(2, 3, True, 0, min_prob=0.2))
    path = save_tuned(model, drafter, tuned)
    assert path == settings_path(model, drafter) and load_tuned(model, drafter) == tuned


@pytest.fixture
def decodes(monkeypatch):
    """Each stream_generate call `tune` makes, as (beam, prompt ids, seed or None when greedy)."""
    generate = importlib.import_module("mlx_redrafter.generate")  # the package's `generate` is the function
    calls = []
    real = generate.stream_generate

    def recorded(model, tokenizer, prompt, beam=None, sampling=None, **kw):
        calls.append((beam, tuple(prompt), None if sampling.greedy else sampling.seed))
        return real(model, tokenizer, prompt, beam=beam, sampling=sampling, **kw)

    monkeypatch.setattr(generate, "stream_generate", recorded)
    return calls


def test_tune_interleaves_every_setting_per_prompt_for_its_budget(setup, decodes, on_cpu):
    model, tok, drafter = setup
    calls = decodes
    tune(model, tok, drafter, candidates=[(2, 3, 0), (1, 2, 0)], prompts=["t1 t2", "t3 t4"], max_tokens=8,
         finalists=1, seconds=0.0, progress=False)
    greedy = [c for c in calls if c[2] is None]
    sampled = [c for c in calls if c[2] is not None]
    # however short the budget: one warm-up each, then MIN_ROUNDS (2) rounds of every setting, one prompt each;
    # sampled: the finalist alone (plain is compared greedy), not warmed again on the CPU
    assert len(greedy) == 3 + 2 * 3 and len(sampled) == 2 * 1
    assert [c[0] is None for c in greedy[3:6]].count(True) == 1  # plain and both candidates in turn
    assert [c[2] for c in sampled] == [0, 1] and None not in [c[0] for c in sampled]  # each round its own draws
    with pytest.raises(ValueError, match="finite"):
        tune(model, tok, drafter, candidates=[(2, 3, 0)], prompts=["t1"], seconds=float("inf"), progress=False)


def test_tune_rounds_rotate_settings_prompts_and_seeds(setup, decodes, on_cpu):
    model, tok, drafter = setup
    calls = decodes
    candidates = [(2, 3, 0), (1, 2, 0), (2, 2, 0)]
    tune(model, tok, drafter, candidates=candidates, prompts=["t1 t2", "t3 t4", "t5 t6"], max_tokens=8, finalists=2,
         seconds=5.0, progress=False)
    settings = [None] + [BeamShape(w, lb, True, n) for w, lb, n in candidates]
    greedy = [c for c in calls if c[2] is None][len(settings):]  # after one warm-up each
    rounds = [greedy[k:k + 4] for k in range(0, len(greedy) - len(greedy) % 4, 4)]
    assert len(greedy) % 4 == 0 and len(rounds) > 2  # the budget, not MIN_ROUNDS (2), decided how many
    for r, calls_in_round in enumerate(rounds):
        assert [c[0] for c in calls_in_round] == settings[r % 4:] + settings[:r % 4]  # every setting, rotated
        assert {c[1] for c in calls_in_round} == {calls_in_round[0][1]}  # one prompt per round
    assert len({rounds[r][0][1] for r in range(3)}) == 3  # the next prompt each round
    sampled = [c for c in calls if c[2] is not None]
    assert [c[2] for c in sampled[:6]] == [0, 0, 1, 1, 2, 2]  # two finalists, each round its own seed


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


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", '"just a string"',
                                  json.dumps({"greedy": {"width": 4.5, "length": 4}, "sampled": None, "machine": "m"}),
                                  json.dumps({"greedy": {"width": 4, "length": 4.7}, "sampled": None, "machine": "m"}),
                                  json.dumps({"greedy": {"width": 4, "length": 4, "lookup": "yes"}, "sampled": None,
                                              "machine": "m"})])
def test_a_damaged_settings_file_is_named_once_and_generation_goes_on(setup, capsys, text):
    """A settings file that is not what `tune` writes (a float width once crashed generate deep in MLX)."""
    model, tok, drafter = setup
    path = settings_path(model, drafter)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    out = list(stream_generate(model, tok, [1, 2, 3], drafter=drafter, max_tokens=6))
    assert out[-1].generation_tokens == 6
    assert load_tuned(model, drafter) is None
    said = capsys.readouterr().err
    assert said.count(f"ignoring the tuned settings in {path}") == 1 and "mlx-redrafter tune" in said


def test_something_at_the_settings_path_that_tune_did_not_write_is_refused(setup):
    model, tok, drafter = setup
    path = settings_path(model, drafter)
    path.mkdir(parents=True)  # a folder where the settings file would go
    with pytest.raises(ValueError, match="something other than a settings file is there; remove it"):
        writable_settings_path(model, drafter)
    assert path.is_dir()


def test_cli_refuses_a_store_it_cannot_write_before_measuring(default_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlx_redrafter.cli import app
    from mlx_redrafter.loading import home

    model_file = next(home().glob("SmolLM2*.gguf"))  # the default model, fetched by the fixture
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    (tmp_path / "tuned").write_text("not a folder")
    r = CliRunner().invoke(app, ["tune", "--model", str(model_file)])
    assert r.exit_code == 2 and r.output.startswith("error: cannot store the result in") and "tune greedy" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_tune_starts_no_round_it_cannot_finish_within_its_share(setup, monkeypatch, on_cpu):
    """A slow machine is not kept past `seconds`: beyond MIN_ROUNDS, a round starts only if it should end in time."""
    import time

    generate = importlib.import_module("mlx_redrafter.generate")
    calls = []

    def slow(model, tokenizer, prompt, beam=None, sampling=None, **kw):
        calls.append(sampling.greedy)
        time.sleep(0.1)  # each decode 0.1 s: a greedy round (plain + the candidate) ~0.2 s, a sampled one ~0.1 s
        yield from range(4)

    monkeypatch.setattr(generate, "stream_generate", slow)
    model, tok, drafter = setup
    tune(model, tok, drafter, candidates=[(2, 3, 0)], prompts=["t1", "t2", "t3"], seconds=0.8, progress=False)
    # greedy share 0.48 s: after two rounds (0.4 s) a third would end at ~0.6 s, so it is not started
    assert calls[:2 + 2 * 2] == [True] * 6 and calls.count(True) == 6
    assert calls.count(False) in (2, 3)  # sampled share 0.32 s: a fourth 0.1 s round would overrun it


def test_on_a_gpu_tune_warms_the_sampled_phase_and_measures_plain_in_it(setup, decodes, monkeypatch):
    """A GPU round is cheap: the sampled phase warms its settings (new kernels) and runs plain beside them."""
    monkeypatch.setattr(backend, "on_gpu", lambda: True)
    model, tok, drafter = setup
    tuned = tune(model, tok, drafter, candidates=[(2, 3, 0), (1, 2, 0)], prompts=["t1 t2", "t3 t4"], max_tokens=8,
                 finalists=1, seconds=0.0, progress=False)
    sampled = [c for c in decodes if c[2] is not None]
    assert len(sampled) == 2 + 2 * 2 and [c[0] is None for c in sampled[2:4]].count(True) == 1
    assert tuned.rows[0]["sampled_tps"] > 0 and tuned.rows[0]["sampled_ratio"] == 1.0


@pytest.mark.parametrize("kw", [dict(width=4.5), dict(length=4.7), dict(nodes="8"), dict(lookup_length=2.0),
                                dict(width=True), dict(lookup="yes"), dict(min_prob="0.1")])
def test_beam_settings_of_the_wrong_type_are_refused_in_words(kw):
    with pytest.raises(ValueError, match="must be"):
        BeamShape(**{"width": 4, "length": 4, **kw})
