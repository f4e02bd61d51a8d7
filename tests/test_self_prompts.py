"""Prompts the base model writes itself (`mlx-redrafter prompts`): the template's user-turn prefix, sampling
that keeps only closed, distinct turns, seeded, and a file that `train --prompts` reads."""

import gzip
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line, tiny_config, tiny_model, word_tokenizer
from mlx_redrafter import self_prompts
from mlx_redrafter.cli import app
from mlx_redrafter.data import read_conversations
from mlx_redrafter.generate import encode_messages
from mlx_redrafter.outputs import check_writable_file


def test_prefix_is_the_templated_chat_up_to_the_users_text(default_model):
    _, tokenizer, _ = default_model
    prefix, closing = self_prompts.user_turn(tokenizer)
    full = encode_messages(tokenizer, [{"role": "user", "content": "Can you help me plan a trip?"}])
    assert full[: len(prefix)] == prefix and len(prefix) < len(full)
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n") and closing == "<|im_end|>"


def inst_tokenizer():
    """Words t0..t9 plus a Llama-2-style chat template: "<s> [INST] text [/INST]", closed by text, not by EOS."""
    return word_tokenizer(10, extra_words=["<s>", "[INST]", "[/INST]", "Hello", "What"],
                          chat_template="<s>{% for m in messages %} [INST] {{ m['content'] }} [/INST]{% endfor %}")


def test_a_turn_closed_by_template_text_is_cut_there():
    tokenizer = inst_tokenizer()
    prefix, closing = self_prompts.user_turn(tokenizer)
    assert tokenizer.decode(prefix) == "<s> [INST]" and closing == "[/INST]"
    eos = set(tokenizer.eos_token_ids)
    assert self_prompts.finished_text(tokenizer, [4, 5, 12, 6, 1], eos, closing) == "t4 t5"  # "t4 t5 [/INST] t6"
    assert self_prompts.finished_text(tokenizer, [4, 5, 12, 6], eos, closing) == "t4 t5"  # closed, then ran on
    assert self_prompts.finished_text(tokenizer, [4, 5, 6], eos, closing) == ""  # never closed


def test_a_model_without_a_chat_template_is_refused():
    with pytest.raises(ValueError, match="no chat template"):
        self_prompts.user_turn(word_tokenizer(16))


def fake_sampler(monkeypatch, batches):
    """sample_prompts over a word tokenizer, its rows from `batches` (each called with the rows asked); the
    sizes asked are returned."""
    monkeypatch.setattr(self_prompts, "user_turn", lambda tok: ([2, 3], ""))
    calls = []
    monkeypatch.setattr(self_prompts, "batch_generate", lambda m, prompts, *a: calls.append(len(prompts)) or batches(len(prompts)))
    return calls


def test_unclosed_empty_and_repeated_rows_are_dropped_and_none_kept_is_an_error(monkeypatch):
    tokenizer = word_tokenizer(16)
    tokenizer.has_chat_template = True
    first = iter([[[6, 7], [4, 5, 1], [4, 5, 1], [1]]])  # unclosed, closed, repeat, empty; then none closes
    calls = fake_sampler(monkeypatch, lambda n: next(first, [[8]] * n))
    assert self_prompts.sample_prompts(None, tokenizer, 3, batch_size=4, progress=False) == ["t4 t5"]
    assert calls == [4, 4, 4]  # 4 rows per prompt asked, then it stops
    with pytest.raises(ValueError, match="closed no user turn within 9 tokens in 8 tries"):
        self_prompts.sample_prompts(None, tokenizer, 2, batch_size=4, max_tokens=9, progress=False)


def test_greedy_sampling_draws_one_row_and_batches_never_exceed_the_rows_allowed(monkeypatch):
    tokenizer = word_tokenizer(16)
    tokenizer.has_chat_template = True
    calls = fake_sampler(monkeypatch, lambda n: [[4, 5, 1]] * n)
    for temperature in (0.0, 1e-6):  # both decode greedily
        calls.clear()
        assert self_prompts.sample_prompts(None, tokenizer, 5, temperature=temperature, progress=False) == ["t4 t5"]
        assert calls == [1]
    calls.clear()
    assert self_prompts.sample_prompts(None, tokenizer, 1, batch_size=256, progress=False) == ["t4 t5"] and calls == [4]


def test_written_prompts_read_back_plain_or_gzipped_and_replace_only_with_force(tmp_path):
    for name in ("p.jsonl", "p.jsonl.gz"):
        path = self_prompts.write_prompts(tmp_path / "new" / name, ["a \"quoted\" one", "two"])
        assert [c.prompt for c in read_conversations(path)] == ['a "quoted" one', "two"]
        with pytest.raises(FileExistsError):
            self_prompts.write_prompts(path, ["three"])
        self_prompts.write_prompts(path, ["three"], force=True)
        assert [c.prompt for c in read_conversations(path)] == ["three"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["p.jsonl", "p.jsonl.gz"]


def test_cli_refuses_bad_output_folders_and_temperatures_before_the_model_loads(monkeypatch, tmp_path):
    import mlx_redrafter.loading as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model loaded"))
    if os.path.isdir("/proc/self"):  # Linux: a folder that exists and takes no new file, even from root
        r = CliRunner().invoke(app, ["prompts", "--out", "/proc/self-prompts.jsonl", "--num", "2"])
        assert r.exit_code == 2 and r.output.startswith("error: cannot write in /proc") and "--out" in r.output, r.output
    r = CliRunner().invoke(app, ["prompts", "--out", str(tmp_path / "p.jsonl"), "--num", "2", "--temp", "inf"])
    assert r.exit_code == 2 and r.output.strip() == "error: --temp must be a finite number, got inf"
    assert list(tmp_path.iterdir()) == []
    check_writable_file(tmp_path / "not" / "made" / "p.jsonl")  # folders still to make: their parent is probed
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


def test_the_python_api_offers_sampling():
    import mlx_redrafter as mr

    assert mr.sample_prompts is self_prompts.sample_prompts and "sample_prompts" in mr.__all__


def test_start_tokens_are_the_templated_head_of_a_user_turn(default_model):
    _, tokenizer, _ = default_model
    prefix, _ = self_prompts.user_turn(tokenizer)
    starts = ["Solve", "Write a story about", " Can you", "Hello", "x = 1\n  y", "日本語で"]  # "Hello": a probe's text
    tokens = self_prompts.start_tokens(tokenizer, starts)
    assert len(tokens) == len(starts)
    for text, ids in zip(starts, tokens):
        assert ids and tokenizer.decode(ids) == text, (text, ids)
        full = encode_messages(tokenizer, [{"role": "user", "content": text}])
        assert full[: len(prefix) + len(ids)] == prefix + ids and len(full) > len(prefix) + len(ids), text
    assert self_prompts.start_tokens(tokenizer, ["Solve", "Solve"]) == [tokens[0], tokens[0]]
    for merged in ("  Solve", "\n\nSolve"):  # SmolLM2 writes the header's "\n" and these as one token: not a clean cut
        with pytest.raises(ValueError, match="rewrites the start text"):
            self_prompts.start_tokens(tokenizer, [merged])


def test_start_tokens_under_a_turn_closed_by_text_and_the_starts_refused():
    tokenizer = inst_tokenizer()  # "<s> [INST] t4 t5 [/INST]"
    assert self_prompts.start_tokens(tokenizer, ["t4 t5", "t6", "t7 t8 t9"]) == [[4, 5], [6], [7, 8, 9]]
    for blank in ("", "   ", "\n"):
        with pytest.raises(ValueError) as e:
            self_prompts.start_tokens(tokenizer, ["t4", blank])
        one_line(e, repr(blank), "is empty")
    for closed in ("t4 [/INST] t5", "t4 [/INST]"):
        with pytest.raises(ValueError) as e:
            self_prompts.start_tokens(tokenizer, [closed])
        one_line(e, repr(closed), "closing text '[/INST]'")
    erasing = word_tokenizer(10, extra_words=["<s>", "[INST]", "[/INST]", "Hello", "What"],  # a template that drops t9
                             chat_template="<s>{% for m in messages %} [INST] {{ m['content'] | replace('t9', '') }} "
                                           "[/INST]{% endfor %}")
    assert self_prompts.start_tokens(erasing, ["t4 t5"]) == [[4, 5]]
    for rewritten in ("t9", "t4 t9"):  # all of it, or some of it
        with pytest.raises(ValueError) as e:
            self_prompts.start_tokens(erasing, [rewritten])
        one_line(e, repr(rewritten), "rewrites")


def recorded_sampler(monkeypatch, rows):
    """batch_generate answering each prompt with the next of `rows`; the prompts of each call are returned."""
    rows, calls = iter(rows), []

    def batch_generate(model, prompts, max_tokens, sampling, eos):
        calls.append([list(p) for p in prompts])
        return [next(rows) for _ in prompts]

    monkeypatch.setattr(self_prompts, "batch_generate", batch_generate)
    return calls


def test_rows_cycle_through_the_starts_across_batches_and_a_start_alone_is_dropped(monkeypatch):
    tokenizer = inst_tokenizer()  # its template is real: user_turn and start_tokens run unpatched
    head = [10, 11]  # "<s> [INST]"
    t4, t56 = head + [4], head + [5, 6]
    calls = recorded_sampler(monkeypatch, [
        [12, 1],  # t4: only the closing text: the start alone, dropped
        [7, 1],  # t5 t6 t7
        [1],  # t4: only the end-of-sequence token, dropped
        [8, 12, 9],  # t5 t6 t8, closed by "[/INST]" and then ran on
        [9, 1],  # t4 t9
        [9, 1],  # t5 t6 t9
    ])
    seed = next(s for s in range(100) if np.random.default_rng(s).permutation(2).tolist() == [0, 1])  # in their order
    texts = self_prompts.sample_prompts(None, tokenizer, 4, batch_size=3, seed=seed, starts=["t4", "t5 t6"], progress=False)
    assert texts == ["t5 t6 t7", "t5 t6 t8", "t4 t9", "t5 t6 t9"]
    assert calls == [[t4, t56, t4], [t56, t4, t56]]  # the second batch goes on where the first stopped
    with pytest.raises(ValueError, match="is empty"):  # refused before anything is sampled
        self_prompts.sample_prompts(None, tokenizer, 4, starts=["t4", " "], progress=False)
    assert len(calls) == 2


def test_greedy_sampling_draws_one_row_per_start(monkeypatch):
    tokenizer = inst_tokenizer()
    calls = recorded_sampler(monkeypatch, [[8, 1], [8, 12], [1]])
    texts = self_prompts.sample_prompts(None, tokenizer, 5, batch_size=2, temperature=0.0,
                                        starts=["t4", "t5 t6", "t7"], progress=False)
    assert [len(c) for c in calls] == [2, 1]  # batches stay within --batch-size
    rows = [row[2:] for call in calls for row in call]  # each start's ids after "<s> [INST]", in the order drawn
    assert sorted(rows) == [[4], [5, 6], [7]]
    said = {4: "t4", 5: "t5 t6", 7: "t7"}
    assert texts == [said[rows[0][0]] + " t8", said[rows[1][0]] + " t8"]  # the third row wrote nothing
    with pytest.raises(TypeError, match="list of texts"):
        self_prompts.sample_prompts(None, tokenizer, 5, starts="t4", progress=False)


def test_the_seed_shuffles_which_start_each_row_takes(monkeypatch):
    tokenizer = inst_tokenizer()
    starts = [f"t{i}" for i in range(4, 10)]
    drawn = []

    def batch_generate(model, prompts, max_tokens, sampling, eos):
        drawn.append([p[2] for p in prompts])  # the start's one id after "<s> [INST]"
        return [[3, 1] for _ in prompts]  # every row writes "t3" and ends its turn

    monkeypatch.setattr(self_prompts, "batch_generate", batch_generate)

    def first(count, seed):
        drawn.clear()
        texts = self_prompts.sample_prompts(None, tokenizer, count, seed=seed, starts=starts, progress=False)
        assert texts == [f"t{i} t3" for i in drawn[0][:count]]
        return drawn[0][:count]

    full = [first(6, seed) for seed in range(6)]
    assert all(sorted(order) == list(range(4, 10)) for order in full)  # a whole cycle takes every start once
    assert len({tuple(order) for order in full}) > 1  # in an order the seed draws
    assert [first(6, seed) for seed in range(6)] == full  # the same seed, the same order
    assert first(2, 3) == full[3][:2]
    assert {tuple(first(2, seed)) for seed in range(6)} != {(4, 5)}  # a short run is not always the first starts


def test_cli_refuses_blank_long_or_too_many_starts_before_the_model_loads(monkeypatch, tmp_path):
    import mlx_redrafter.loading as loading
    from mlx_redrafter.cli import MAX_START_CHARS, MAX_STARTS

    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded

    monkeypatch.setattr(loading, "load", load)
    out = tmp_path / "p.jsonl"
    base = ["prompts", "--out", str(out), "--num", "2", "--start", "Solve"]  # and MAX_STARTS x's: one too many
    for starts in ([""], ["  "], ["x" * (MAX_START_CHARS + 1)], ["x"] * (MAX_STARTS - 1) + [""], ["x"] * MAX_STARTS):
        r = CliRunner().invoke(app, base + [a for s in starts for a in ("--start", s)])
        assert r.exit_code == 2 and r.exception is not None and not isinstance(r.exception, Loaded), r.output
        assert r.output.startswith("error: --start takes up to") and len(r.output.strip().splitlines()) == 1, r.output
        assert "not ''" in r.output or "not '  '" in r.output or "'..." in r.output or f"got {MAX_STARTS + 1}" in r.output
        assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(app, base + ["--start", "x" * MAX_START_CHARS])  # the longest allowed passes on to load
    assert isinstance(r.exception, Loaded), r.output


def test_cli_reads_start_texts_from_a_file_and_refuses_one_that_is_not_text(monkeypatch, tmp_path):
    import mlx_redrafter.cli as cli
    import mlx_redrafter.loading as loading

    asked = []
    monkeypatch.setattr(loading, "load", lambda *a, **k: ("model", "tokenizer"))
    monkeypatch.setattr(self_prompts, "sample_prompts", lambda *a, starts, **k: asked.append(starts) or ["p1", "p2"])
    listed = tmp_path / "starts.txt"
    listed.write_bytes("\ufeffSolve\n\n  \n  Write a poem\r\n".encode())  # a byte-order mark, blank and indented lines
    out = tmp_path / "p.jsonl"
    r = CliRunner().invoke(app, ["prompts", "--out", str(out), "--num", "2", "--start", "A", "--start-file", str(listed)])
    assert r.exit_code == 0 and asked == [["A", "Solve", "Write a poem"]], r.output
    assert [c.prompt for c in read_conversations(out)] == ["p1", "p2"]
    monkeypatch.setattr(cli, "MAX_STARTS", 2)  # a file longer than 2 starts could be: refused unread past the bound
    big = tmp_path / "big.txt"
    big.write_text("x\n" * (2 * (4 * cli.MAX_START_CHARS + 2)))
    r = CliRunner().invoke(app, ["prompts", "--out", str(tmp_path / "q.jsonl"), "--num", "2", "--start-file", str(big)])
    assert r.exit_code == 2 and "bytes, more than 2 starts can take" in r.output and len(asked) == 1, r.output
    monkeypatch.setattr(cli, "MAX_STARTS", 10_000)
    binary, empty = tmp_path / "b.txt", tmp_path / "e.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    empty.write_text("\n  \n")
    for path, problem in ((tmp_path / "none.txt", "does not exist"), (tmp_path, "cannot read"),
                          (binary, "is not UTF-8 text"), (empty, "holds no start text")):
        r = CliRunner().invoke(app, ["prompts", "--out", str(tmp_path / "q.jsonl"), "--num", "2", "--start-file", str(path)])
        assert r.exit_code == 2 and problem in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "q.jsonl").exists()
    assert len(asked) == 1  # none of the refused runs sampled
