"""Prompts the base model writes itself (`mlx-redrafter prompts`): the template's user-turn prefix, sampling
that keeps only closed, distinct turns, seeded, and a file that `train --prompts` reads."""

import gzip
import json
import os

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, tiny_model, word_tokenizer
from mlx_redrafter import self_prompts
from mlx_redrafter.cli import app
from mlx_redrafter.data import read_conversations
from mlx_redrafter.generate import encode_messages


def test_prefix_is_the_templated_chat_up_to_the_users_text(default_model):
    _, tokenizer, _ = default_model
    prefix = self_prompts.user_turn_prefix(tokenizer)
    full = encode_messages(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert full[: len(prefix)] == prefix and len(prefix) < len(full)
    assert tokenizer.decode(prefix).endswith("user\n")


def test_a_model_without_a_chat_template_is_refused():
    with pytest.raises(ValueError, match="no chat template"):
        self_prompts.user_turn_prefix(word_tokenizer(16))


def test_unclosed_rows_are_dropped_and_none_kept_is_an_error(monkeypatch):
    tokenizer = word_tokenizer(16)
    tokenizer.has_chat_template = True
    monkeypatch.setattr(self_prompts, "user_turn_prefix", lambda tok: [2, 3])
    rows = iter([[[4, 5, 1], [6, 7], [4, 5, 1], [1]]] + [[[8]] * 4] * 8)  # closed, unclosed, repeat, empty
    monkeypatch.setattr(self_prompts, "batch_generate", lambda *a: next(rows))
    assert self_prompts.sample_prompts(None, tokenizer, 1, batch_size=4, progress=False) == ["t4 t5"]
    with pytest.raises(ValueError, match="closed no user turn within 9 tokens in 8 tries"):
        self_prompts.sample_prompts(None, tokenizer, 2, batch_size=4, max_tokens=9, progress=False)


def test_greedy_sampling_stops_after_one_batch(monkeypatch):
    tokenizer = word_tokenizer(16)
    tokenizer.has_chat_template = True
    monkeypatch.setattr(self_prompts, "user_turn_prefix", lambda tok: [2, 3])
    calls = []
    monkeypatch.setattr(self_prompts, "batch_generate", lambda m, prompts, *a: calls.append(len(prompts)) or [[4, 5, 1]] * len(prompts))
    assert self_prompts.sample_prompts(None, tokenizer, 5, batch_size=8, temperature=0.0, progress=False) == ["t4 t5"]
    assert calls == [8]
    calls.clear()  # sampled, no batch is larger than the rows still allowed (4 per prompt asked)
    assert self_prompts.sample_prompts(None, tokenizer, 1, batch_size=256, progress=False) == ["t4 t5"] and calls == [4]


def test_cli_refuses_bad_output_folders_and_temperatures_before_the_model_loads(monkeypatch, tmp_path):
    import mlx_redrafter.loading as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model loaded"))
    if os.path.isdir("/proc/self"):  # Linux: a folder that exists and takes no new file, even from root
        r = CliRunner().invoke(app, ["prompts", "--out", "/proc/self-prompts.jsonl", "--num", "2"])
        assert r.exit_code == 2 and r.output.startswith("error: cannot write in /proc") and "--out" in r.output, r.output
    r = CliRunner().invoke(app, ["prompts", "--out", str(tmp_path / "p.jsonl"), "--num", "2", "--temp", "inf"])
    assert r.exit_code == 2 and r.output.strip() == "error: --temp must be a finite number, got inf"
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_seeded_prompts_train_reads_and_never_replaces_a_file(default_model, tmp_path):
    model, tokenizer, _ = default_model
    size = dict(batch_size=2, max_tokens=32, seed=1)  # seed 1 closes both rows early: a few seconds on a CPU
    texts = self_prompts.sample_prompts(model, tokenizer, 2, progress=False, **size)
    assert len(set(texts)) == 2 and all(t and t == t.strip() and "<|im_end|>" not in t for t in texts)
    out = tmp_path / "self.jsonl.gz"
    r = CliRunner().invoke(app, ["prompts", "--out", str(out), "--num", "2", "--batch-size", "2", "--max-tokens", "32",
                                 "--seed", "1"])
    assert r.exit_code == 0 and "wrote 2 prompts" in r.output, r.output
    records = [json.loads(line) for line in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert [x["prompt"] for x in records] == texts  # the same seed writes the same prompts
    assert [c.prompt for c in read_conversations(out, all_turns=True)] == texts
    mine = tmp_path / "notes.jsonl"
    mine.write_text("keep me\n")
    r = CliRunner().invoke(app, ["prompts", "--out", str(mine), "--num", "2"])
    assert r.exit_code == 2 and "already exists" in r.output and mine.read_text() == "keep me\n"


def test_cli_refuses_a_model_without_a_chat_template(tmp_path):
    from test_loading import write_model_dir

    model_dir = write_model_dir(tmp_path / "m", tiny_model(tiny_config()), tiny_config())
    r = CliRunner().invoke(app, ["prompts", "--model", str(model_dir), "--out", str(tmp_path / "p.jsonl"), "--num", "2"])
    assert r.exit_code == 2 and r.output.startswith("error: the model has no chat template"), r.output
    assert not (tmp_path / "p.jsonl").exists()
