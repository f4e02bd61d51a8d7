"""Distillation data, training (learning, resume, Ctrl-C) and evaluation, on tiny models."""

import gzip
import shutil
import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import stand_in_kernel, tiny_config, tiny_drafter, tiny_model, word_tokenizer
from mlx_redrafter import training
from mlx_redrafter.beam_search import BeamShape
from mlx_redrafter.data import Conversation, read_conversations
from mlx_redrafter.distill import DataConfig, batch_generate, make_distillation_data, read_sequences
from mlx_redrafter.evaluate import acceptance, greedy_references, replay_acceptance
from mlx_redrafter.generate import plain_steps
from mlx_redrafter.sampling import SamplingConfig
from mlx_redrafter.training import TrainConfig, fit

VOCAB = 24


@pytest.fixture(scope="module")
def base():
    return tiny_model(tiny_config(vocab_size=VOCAB), seed=3, scale=2.0)


def test_prompt_formats(tmp_path):
    share = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
             {"conversations": [{"from": "gpt", "value": "orphan"}]}, {"conversations": [{"from": "human", "value": "2nd"}]}]
    text = json.dumps(share)
    (tmp_path / "cut.json").write_text(text[: text.rindex("{")])  # truncated mid-record
    assert [(c.prompt, c.reference) for c in read_conversations(tmp_path / "cut.json")] == [("hi", "hello")]
    lines = [{"messages": [{"role": "user", "content": "a"}]}, {"turns": ["b", "b2"]}, {"prompt": "c", "response": "d"}, "e"]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    assert [c.prompt for c in read_conversations(tmp_path / "p.jsonl.gz")] == ["a", "b", "c", "e"]
    chat = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                               {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}, {"from": "human", "value": "q3"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    turns = read_conversations(tmp_path / "chat.json", all_turns=True)
    assert [(c.prompt, c.reference, c.history) for c in turns] == [
        ("q1", "a1", ()), ("q2", "a2", (("q1", "a1"),)), ("q3", None, (("q1", "a1"), ("q2", "a2")))]
    assert [m["role"] for m in turns[2].messages()] == ["user", "assistant", "user", "assistant", "user"]
    assert len(read_conversations(tmp_path / "chat.json")) == 1
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="holds no prompts"):
        read_conversations(tmp_path / "bad.jsonl")


def test_batched_generation_equals_one_at_a_time(base):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    outs = batch_generate(base, prompts, 30, SamplingConfig(), eos=set())
    for p, o in zip(prompts, outs):
        steps = plain_steps(base, p, SamplingConfig())
        assert o == [next(steps)[0][0] for _ in range(30)]


def test_rows_that_finish_leave_the_batch_and_the_rest_are_unchanged(base, monkeypatch):
    """EOS tokens that end rows at different steps: finished rows are dropped from the batch (and its
    cache) as they pile up, and every row still equals its prompt decoded alone, up to its EOS."""
    from mlx_redrafter.kv_cache import KVCache

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22, 23]]
    alone = []
    for p in prompts:
        steps = plain_steps(base, p, SamplingConfig())
        alone.append([next(steps)[0][0] for _ in range(30)])
    eos = {17, 19}
    expected = [a[:next((i + 1 for i, t in enumerate(a) if t in eos), len(a))] for a in alone]
    assert sorted(len(e) for e in expected) == [1, 9, 24, 30, 30, 30]  # this model's rows end apart
    kept, keep_rows = [], KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, rows: kept.append(rows.tolist()) or keep_rows(self, rows))
    assert batch_generate(base, prompts, 30, SamplingConfig(), eos=eos) == expected
    assert kept == [[0, 2, 3, 5], [0, 1, 2]]  # two of six finished, then one of the four left


def tiny_data(base, tmp_path, n=48, interrupt_after=None, monkeypatch=None):
    tok = word_tokenizer(VOCAB, eos=1)
    rng = np.random.default_rng(0)
    convs = [Conversation(" ".join(f"t{i}" for i in rng.integers(2, VOCAB, 5))) for _ in range(n)]
    cfg = DataConfig(max_new_tokens=24, batch_size=8, shard_size=16)
    return make_distillation_data(base, tok, convs, tmp_path, cfg, progress=False)


def test_data_generation_resumes(base, tmp_path, monkeypatch):
    full = tiny_data(base, tmp_path / "full")
    import mlx_redrafter.distill as distill

    real_write, calls = distill._write_shard, []

    def failing_write(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(*a)

    monkeypatch.setattr(distill, "_write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        tiny_data(base, tmp_path / "cut")
    assert len(list((tmp_path / "cut").glob("shard-*.npz"))) == 1 and not list((tmp_path / "cut").glob("*.tmp*"))
    monkeypatch.setattr(distill, "_write_shard", real_write)
    tiny_data(base, tmp_path / "cut")
    a, b = read_sequences(full), read_sequences(tmp_path / "cut")
    assert len(a) == len(b) == 48 and all((x == y).all() and p == q for (x, p), (y, q) in zip(a, b))
    with pytest.raises(ValueError, match="other settings or prompts"):
        tiny_data(base, tmp_path / "cut", n=40)  # other prompts into the same directory


def weights(drafter):
    return {k: np.array(v) for k, v in tree_flatten(drafter.parameters())}


@pytest.mark.parametrize("stop_at, step", [(2, 8), (3, 9)])  # at a checkpoint; one step past it, still in flight
def test_resume_reaches_the_same_weights(base, tmp_path, monkeypatch, stop_at, step):
    examples = read_sequences(tiny_data(base, tmp_path / "data"))
    cfg = TrainConfig(head="full", exit_dim=32, num_draft_layers=1, batch_size=8, epochs=2, checkpoint_every=4)
    straight, metrics = fit(base, examples, tmp_path / "a", cfg, progress=False, save_dtype=mx.float32)
    assert len(metrics["loss_history"]) == metrics["steps"]  # every step's loss is read, the last one too
    real_batches = training.batches

    def interrupted(examples, cfg, epoch):
        for i, batch in enumerate(real_batches(examples, cfg, epoch)):
            if epoch == 1 and i == stop_at:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the second epoch
            yield batch

    monkeypatch.setattr(training, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(base, examples, tmp_path / "b", cfg, progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == step  # a usable checkpoint at the interruption
    monkeypatch.setattr(training, "batches", real_batches)
    resumed, _ = fit(base, examples, tmp_path / "b", cfg, resume=True, progress=False, save_dtype=mx.float32)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("head", ["reduced", "shared"])
def test_training_learns_what_the_base_model_says(base, tmp_path, head):
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=96))
    cfg = TrainConfig(head=head, draft_vocab_size=16, batch_size=8, epochs=12, lr=3e-3, checkpoint_every=1000,
                      holdout=8)
    drafter, metrics = fit(base, examples, tmp_path / head, cfg, progress=False)
    assert metrics["final_top1_per_position"][0] > 0.5
    assert metrics["examples"] == 88 and metrics["heldout_examples"] == 8
    assert len(metrics["heldout_top1_per_position"]) == cfg.unroll and metrics["heldout_top1_per_position"][0] > 0.8
    tok = word_tokenizer(VOCAB, eos=1)
    prompts = ["t3 t4 t5", "t9 t2", "t7 t7 t8 t20"]
    trained = acceptance(base, tok, drafter, prompts, BeamShape(2, 4), max_tokens=32, progress=False)
    random = acceptance(base, tok, tiny_drafter(base, "apple", seed=9), prompts, BeamShape(2, 4), 32, progress=False)
    assert trained["tokens_per_step"] > random["tokens_per_step"] and trained["tokens_per_step"] > 1.5


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    examples = read_sequences(tiny_data(base, tmp / "data", n=96))
    cfg = TrainConfig(head="full", exit_dim=32, batch_size=8, epochs=8, lr=3e-3, checkpoint_every=1000)
    return fit(base, examples, tmp / "drafter", cfg, progress=False)[0]


@pytest.mark.parametrize("shape", [BeamShape(2, 4, lookup=False), BeamShape(3, 3, lookup=True), BeamShape(1, 6),
                                   BeamShape(3, 4, lookup=True, min_prob=0.5)])
def test_replayed_acceptance_equals_decoding(base, trained, shape):
    """Counting along greedy references gives the steps that speculative decoding takes (min_prob's cut too)."""
    tok = word_tokenizer(VOCAB, eos=1)
    drafter = trained
    prompts = ["t3 t4 t5", "t9 t2", "t7 t7 t8 t20", "t11"]
    decoded = acceptance(base, tok, drafter, prompts, shape, max_tokens=40, progress=False)
    replayed = replay_acceptance(base, drafter, greedy_references(base, tok, prompts, 40, 3, False), shape, False)
    assert decoded["steps"] > len(prompts) and decoded["tokens"] > decoded["steps"]  # drafts were accepted
    assert (replayed["steps"], replayed["tokens"]) == (decoded["steps"], decoded["tokens"])


def test_training_continues_from_a_drafter(base, tmp_path):
    """init=: the drafter's weights, shape and draft vocabulary are the start; the config's shape fields give way."""
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=48))
    first, _ = fit(base, examples, tmp_path / "a", TrainConfig(head="reduced", draft_vocab_size=12, exit_dim=16,
                                                               batch_size=8, epochs=1), progress=False,
                   save_dtype=mx.float32)
    cfg = TrainConfig(head="full", exit_dim=32, batch_size=8, epochs=1, lr=1e-12, warmup=0.0, max_steps=1,
                      init=str(tmp_path / "a"))  # a `train` output folder: its drafter/ is read
    again, metrics = fit(base, examples[::-1], tmp_path / "b", cfg, progress=False, save_dtype=mx.float32)
    assert again.config == first.config and metrics["train_config"]["init"] == cfg.init
    first_record = json.loads((tmp_path / "a" / "drafter" / "config.json").read_text())["training"]
    saved = json.loads((tmp_path / "b" / "drafter" / "config.json").read_text())["training"]
    assert saved["init_training"] == first_record and saved["steps"] == 1 != first_record["steps"]  # both stages told
    assert "head" not in saved["train_config"] and "exit_dim" not in saved["train_config"]  # gave way to --init's
    assert saved["train_config"]["lr"] == 1e-12 and saved["train_config"]["max_steps"] == 1  # the rest is kept
    a, b = weights(first), weights(again)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert np.array_equal(np.array(first.draft_to_token), np.array(again.draft_to_token))
    with pytest.raises(FileNotFoundError, match="no drafter at"):
        fit(base, examples, tmp_path / "c", TrainConfig(init=str(tmp_path / "nothing")), progress=False)


def test_a_multi_layer_drafter_trains_and_replays_as_it_decodes(base, tmp_path):
    """feature_layers: the drafter reads a lower base layer too; trained, saved, reloaded, and counted the same
    by replay and by decoding."""
    from mlx_redrafter.drafter import load_drafter

    examples = read_sequences(tiny_data(base, tmp_path / "data", n=96))
    cfg = TrainConfig(head="full", exit_dim=32, feature_layers=[0], batch_size=8, epochs=8, lr=3e-3,
                      checkpoint_every=1000)
    fit(base, examples, tmp_path / "f", cfg, progress=False, save_dtype=mx.float32)
    drafter = load_drafter(tmp_path / "f" / "drafter", base)
    H = base.args.hidden_size
    assert drafter.config.feature_layers == [0] and np.abs(np.array(drafter.feature_proj.weight)[:, :H]).max() > 0
    tok = word_tokenizer(VOCAB, eos=1)
    prompts = ["t3 t4 t5", "t9 t2", "t7 t7 t8 t20", "t11"]
    shape = BeamShape(3, 3, lookup=True)
    decoded = acceptance(base, tok, drafter, prompts, shape, max_tokens=40, progress=False)
    replayed = replay_acceptance(base, drafter, greedy_references(base, tok, prompts, 40, 3, False), shape, False)
    assert decoded["tokens"] > decoded["steps"] > len(prompts)
    assert (replayed["steps"], replayed["tokens"]) == (decoded["steps"], decoded["tokens"])
    with pytest.raises(ValueError, match="reads base layer 5, but the base model has 2 layers"):
        fit(base, examples, tmp_path / "g", TrainConfig(feature_layers=[5]), progress=False)


def test_extra_examples_never_hold_a_held_out_prompt(base, tmp_path):
    """Other replies to a held-out prompt (extra_examples) are dropped: held-out stays unseen."""
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=24))
    other = [(np.concatenate([t[:p], t[p:][::-1]]), p) for t, p in examples]  # other replies, same prompts
    cfg = TrainConfig(head="full", exit_dim=16, batch_size=8, epochs=1, holdout=4, max_steps=1)
    _, metrics = fit(base, examples, tmp_path / "a", cfg, progress=False, extra_examples=other)
    held_prompts = {tuple(t[:p].tolist()) for t, p in training.split_holdout(examples, cfg)[1]}
    kept = [e for e in other if tuple(e[0][: e[1]].tolist()) not in held_prompts]
    assert metrics["examples"] == 20 + len(kept) and len(kept) <= 20


def test_a_seq_len_that_cuts_off_every_reply_is_named(base, tmp_path):
    """It used to fail inside MLX ("[logsumexp] Received empty array"); examples cut off alone are dropped."""
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=16))
    shortest = min(p for _, p in examples)
    with pytest.raises(ValueError, match=f"--seq-len {shortest} cuts off every reply: the shortest prompt is {shortest}"):
        fit(base, examples, tmp_path / "a", TrainConfig(head="full", exit_dim=16, batch_size=8, seq_len=shortest,
                                                        max_steps=1), progress=False)
    cut = [(np.concatenate([t[:p], t[p:]]), len(t)) for t, p in examples[:4]]  # all prompt: nothing to learn
    _, metrics = fit(base, examples + cut, tmp_path / "b", TrainConfig(head="full", exit_dim=16, batch_size=8,
                                                                        max_steps=1), progress=False)
    assert metrics["examples"] == len(examples)


def test_a_data_folder_of_someone_elses_files_is_refused_and_left_alone(base, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shard-00000.npz").write_text("my own file")
    with pytest.raises(ValueError, match="holds files mlx-redrafter did not write"):
        tiny_data(base, mine, n=8)
    assert sorted(p.name for p in mine.iterdir()) == ["shard-00000.npz"]
    with pytest.raises(ValueError, match="shard-00000.npz is not a distillation shard"):
        read_sequences(mine)
    data = tiny_data(base, tmp_path / "data", n=16)
    shard = sorted(data.glob("shard-*.npz"))[0]
    with np.load(shard) as z:
        arrays = dict(z)
    np.savez(shard, **{**arrays, "offsets": arrays["offsets"] + 10**6})  # offsets past the tokens
    with pytest.raises(ValueError, match="is not a well-formed distillation shard"):
        read_sequences(data)


def test_training_never_differentiates_the_cuda_kernel(base, tmp_path, monkeypatch):
    """MLX's custom CUDA kernels have no gradient, so training must never differentiate a few-row call
    (it doesn't: a batch's start positions are padded to a multiple of 2048 rows). Here a stand-in for
    the kernel computes the same product and fails when differentiated, and `available` answers as on a
    CUDA GPU (2-64 rows): the base model's 16-row forwards use it, the drafter's gradient does not."""
    from mlx_redrafter import cuda_matmul

    examples = read_sequences(tiny_data(base, tmp_path / "data", n=16))
    calls = stand_in_kernel(monkeypatch, gradient=False)
    cfg = TrainConfig(head="full", exit_dim=16, batch_size=1, seq_len=16, unroll=2, max_steps=3, holdout=2)
    drafter, metrics = fit(base, examples, tmp_path / "d", cfg, progress=False)
    assert 16 in [rows for rows, _ in calls] and len(metrics["loss_history"]) == 3 and all(np.isfinite(metrics["loss_history"]))
    calls.clear()
    cuda_matmul.Linear(16, 8)(mx.ones((5, 16)))
    assert calls == [(5, cuda_matmul.Fused(bias=True))]   # the stand-in is what a few-row call runs


def test_resume_at_the_end_keeps_the_metrics_and_refuses_another_shape(base, tmp_path):
    """--resume of a finished run rewrote its metrics as NaN; of another shape it trained the old one silently."""
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=16))
    cfg = TrainConfig(head="full", exit_dim=16, num_draft_layers=1, batch_size=8, max_steps=2)
    _, first = fit(base, examples, tmp_path / "run", cfg, progress=False)
    before = (tmp_path / "run" / "drafter" / "config.json").read_text()
    with pytest.raises(ValueError, match="num_draft_layers 1 \\(asked: 2\\)"):
        fit(base, examples, tmp_path / "run", replace(cfg, num_draft_layers=2, max_steps=4), resume=True, progress=False)
    with pytest.raises(ValueError, match="is at step 2, past this run's end at step 1"):
        fit(base, examples, tmp_path / "run", replace(cfg, max_steps=1), resume=True, progress=False)
    assert (tmp_path / "run" / "drafter" / "config.json").read_text() == before
    shutil.rmtree(tmp_path / "run" / "drafter")  # as if stopped after the last checkpoint, before the drafter
    for _ in range(2):  # ... and again once finished: the same steps and metrics, the training time kept
        _, metrics = fit(base, examples, tmp_path / "run", cfg, resume=True, progress=False)
        for key in ("steps", "final_loss", "final_top1_per_position", "heldout_top1_per_position"):
            assert metrics[key] == first[key], key
        assert metrics["wall_seconds"] >= first["wall_seconds"]


def test_a_shard_left_half_written_is_not_read_as_a_shard(base, tmp_path):
    data = tiny_data(base, tmp_path / "data", n=16)
    (data / "shard-00000.tmp.npz").write_bytes(b"cut off by a kill")
    assert len(read_sequences(data)) == 16


@pytest.mark.parametrize("manifest", [{"prompts": 10**15}, {"config": {"batch_size": 0, "shard_size": 0}}])
def test_a_manifest_promising_absurd_shards_is_refused_at_once(base, tmp_path, manifest):
    """10**15 prompts checked 10**15 paths (no end); shard size 0 divided by zero."""
    data = tiny_data(base, tmp_path / "data", n=16)
    m = json.loads((data / "manifest.json").read_text())
    m.update(manifest if "prompts" in manifest else {"config": {**m["config"], **manifest["config"]}})
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="is not a data manifest"):
        read_sequences(data)


def test_data_from_another_vocabulary_is_refused_before_training(base, tmp_path):
    """Token ids past the base model's vocabulary crashed MLX (a segfault) or raised IndexError."""
    data = tiny_data(base, tmp_path / "data", n=16)
    shard = sorted(data.glob("shard-*.npz"))[0]
    with np.load(shard) as z:
        arrays = dict(z)
    arrays["tokens"] = arrays["tokens"].astype(np.int32)
    arrays["tokens"][-1] = VOCAB + 5
    np.savez(shard, **arrays)
    with pytest.raises(ValueError, match=f"holds token id {VOCAB + 5}, past the base model's vocabulary of {VOCAB}"):
        training.sequences_for(base, data)


def test_position_decay_weighs_each_drafted_positions_loss(base):
    """--position-decay d: position k's loss counts d**k. Position 1's loss alone is the 2-step sum
    less the 1-step sum (the first step is the same computation), so decay 0.5 gives first + half of it."""
    drafter = tiny_drafter(base, "apple")
    H, N = base.args.hidden_size, 6
    mx.random.seed(7)
    hidden, embeds = mx.random.normal((N, H)), mx.random.normal((2, N, H))
    targets = mx.random.randint(0, VOCAB, (2, N))
    valid = mx.array([[True] * N, [True, False] * (N // 2)])

    def total(unroll, decay):
        cfg = TrainConfig(unroll=unroll, position_decay=decay)
        return training.drafter_sums(drafter, base, hidden, embeds, targets, valid, cfg, None, None)[0].item()

    first, both = total(1, 1.0), total(2, 1.0)
    assert both > first > 0
    assert total(2, 0.5) == pytest.approx(first + 0.5 * (both - first), rel=1e-5)
    with pytest.raises(ValueError, match="position-decay"):
        TrainConfig(position_decay=0.0)


def test_teacher_top_k_in_row_chunks_equals_one_pass(base, monkeypatch):
    """The KL teacher is computed TEACHER_ROWS rows at a time (a batch's full-vocabulary logits at once
    crashed MLX CUDA); the chunks must give what one pass gives: the k largest logits, renormalized."""
    mx.random.seed(5)
    hidden = mx.random.normal((3, 7, base.args.hidden_size))
    monkeypatch.setattr(training, "TEACHER_ROWS", 4)
    idx, probs = training.teacher_top_k(base, hidden, 5)
    assert idx.shape == probs.shape == (3, 7, 5)
    logits = np.array(base.logits(hidden).astype(mx.float32))
    want = np.sort(logits, axis=-1)[..., -5:]
    got = np.take_along_axis(logits, np.array(idx), axis=-1)
    np.testing.assert_allclose(np.sort(got, axis=-1), want, rtol=1e-6)
    np.testing.assert_allclose(np.array(probs).sum(-1), 1.0, rtol=1e-5)
    ref = np.exp(got - got.max(-1, keepdims=True))
    np.testing.assert_allclose(np.array(probs), ref / ref.sum(-1, keepdims=True), rtol=1e-5)


def test_kl_training_runs_in_chunks_and_learns(base, tmp_path, monkeypatch):
    """--kl-weight: the loss adds the cross-entropy to the base's top-k; with the teacher computed
    in chunks of 8 rows training still runs, and its loss falls."""
    monkeypatch.setattr(training, "TEACHER_ROWS", 8)
    examples = read_sequences(tiny_data(base, tmp_path / "data", n=16))
    cfg = TrainConfig(head="full", exit_dim=16, batch_size=4, seq_len=16, unroll=2, epochs=6, kl_weight=1.0, kl_top_k=4)
    _, metrics = fit(base, examples, tmp_path / "d", cfg, progress=False)
    losses = metrics["loss_history"]
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4])


def test_pack_rows_places_every_sequence_whole_and_apart():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, 50).tolist()
    place = training.pack_rows(lengths, 40)
    used = {}
    for n, (row, offset) in zip(lengths, place):
        assert 0 <= offset and offset + n <= 40
        cells = {(row, c) for c in range(offset, offset + n)}
        assert not cells & used.keys()
        used.update(dict.fromkeys(cells))
    rows = max(r for r, _ in place) + 1
    fill = [sum(n for n, (r, _) in zip(lengths, place) if r == row) for row in range(rows)]
    for later in range(1, rows):  # first fit: nothing in a later row would have fit in an earlier one
        smallest = min(n for n, (r, _) in zip(lengths, place) if r == later)
        assert all(smallest > 40 - fill[earlier] for earlier in range(later))


@pytest.mark.parametrize("variant", ["apple", "reduced-vocab", "features"])
def test_a_packed_batch_trains_as_its_examples_one_at_a_time(base, variant):
    """Examples packed into shared rows (own positions, attention within each) give the same loss
    sums, hits and counts as each example in a batch of its own, and as one example a row (plain
    causal attention, pack=False): packing changes no training target."""
    drafter = tiny_drafter(base, variant)
    cfg = TrainConfig(unroll=3, seq_len=32)
    to_draft = training.draft_ids(drafter)
    rng = np.random.default_rng(1)
    examples = [(rng.integers(2, VOCAB, n), int(p)) for n, p in zip(rng.integers(4, 40, 9), rng.integers(0, 6, 9))]

    def sums(rows, pack=True):
        batch = training.make_batch(rows, cfg.seq_len, cfg.unroll, pack)
        inputs = training.base_inputs(base, drafter, batch, cfg, with_teacher=False)
        return batch, [np.array(s) for s in training.drafter_sums(drafter, base, *inputs[:4], cfg, to_draft, None)]

    packed, together = sums(examples)
    assert packed.x.shape[0] < len(examples)  # several examples share a row
    alone = [sums([e])[1] for e in examples]
    unpacked, in_rows = sums(examples, pack=False)
    assert unpacked.x.shape[0] == len(examples) and unpacked.mask is None
    for part, want, row_part in zip(together, (sum(a[i] for a in alone) for i in range(3)), in_rows):
        np.testing.assert_allclose(part, want, rtol=1e-4)
        np.testing.assert_allclose(part, row_part, rtol=1e-4)
    if to_draft is None:  # (a reduced vocabulary also leaves out targets it lacks)
        # step k of a start t is counted where x_{t+k+1} exists: t from max(p - 2, 0) up to n - k - 2
        want = [sum(max(0, min(len(t), 32) - k - 1 - max(p - 2, 0)) for t, p in examples) for k in (1, 2, 3)]
        assert together[2].tolist() == want


def test_make_batch_reads_each_example_where_it_was_packed():
    """Independently of the layout: each start position reads its own example's token and position,
    each step consumes x_{t+k} and targets x_{t+k+1} of that example, exactly the starts with a response
    target are there (short examples, prompts past the end, truncation at seq_len included), and
    attention stays within each example."""
    spec = [(40, 0), (3, 1), (2, 0), (25, 30), (12, 2), (18, 5), (50, 10), (7, 7), (9, 1)]  # (length, prompt_len)
    examples = [(1000 * (i + 1) + np.arange(n), p) for i, (n, p) in enumerate(spec)]  # token = 1000 (i + 1) + t
    b = training.make_batch(examples, seq_len=32, unroll=3)
    x, positions = np.array(b.x).reshape(-1), np.array(b.positions).reshape(-1)
    starts, inputs, valid = np.array(b.starts), np.array(b.inputs), np.array(b.valid)
    assert len(starts) % 2048 == 0 and b.x.shape[0] < len(spec)
    seen = set()
    for j in np.flatnonzero(valid[0]):  # padding is never valid
        i, t = divmod(int(x[starts[j]]) - 1000, 1000)
        n = min(spec[i][0], 32)
        assert positions[starts[j]] == t and (i, t) not in seen
        seen.add((i, t))
        assert valid[:, j].tolist() == [t + k + 1 < n for k in (1, 2, 3)]
        for k in (1, 2, 3):
            if valid[k - 1, j]:
                assert (x[inputs[k - 1, j]], x[inputs[k - 1, j] + 1]) == (x[starts[j]] + k, x[starts[j]] + k + 1)
    assert seen == {(i, t) for i, (n, p) in enumerate(spec) for t in range(min(n, 32)) if p <= t + 2 < min(n, 32)}
    ids = np.array(b.x) // 1000 - 1  # padding: -1
    causal = np.arange(32)[None, :] <= np.arange(32)[:, None]
    assert (np.array(b.mask)[:, 0] == ((ids[:, :, None] == ids[:, None, :]) & causal)).all()
