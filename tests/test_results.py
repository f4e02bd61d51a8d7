"""Training, evaluation and benchmarking from Python: `mr.train`, `mr.eval_drafter` and
`mr.benchmark` return result objects holding what the command line prints, with a `.plot()`."""

import json
import shutil

import matplotlib

matplotlib.use("Agg")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_redrafter as mr  # noqa: E402
from conftest import one_line  # noqa: E402
from mlx_redrafter import speed  # noqa: E402
from mlx_redrafter.outputs import UnsafeOutputError  # noqa: E402
from mlx_redrafter.evaluate import acceptance_grid, markdown_table  # noqa: E402
from mlx_redrafter.progress import MININTERVAL, progress  # noqa: E402
from test_api import loaded, model_dir  # noqa: E402,F401  (a tiny model whose drafter/ is always accepted)

PROMPTS = [f"t{i} t{i + 1} t{i + 2}" for i in range(2, 26)]


@pytest.fixture(scope="module")
def run(loaded, tmp_path_factory):
    model, tok = loaded
    out = tmp_path_factory.mktemp("train") / "run"
    return mr.train(out, model, tok, prompts=PROMPTS, max_new_tokens=12, gen_batch_size=24, head="full",
                    exit_dim=32, num_draft_layers=1, batch_size=8, epochs=2, holdout=8, progress=False)


def test_train_returns_what_the_cli_prints_and_writes(run):
    assert isinstance(run, mr.TrainResult)
    record = json.loads((run.out / "training.json").read_text())
    assert run.steps == record["steps"] == 4  # (24 - 8 held out) // 8 per epoch, 2 epochs
    assert run.final_loss == record["final_loss"] and run.wall_seconds == record["wall_seconds"]
    assert run.top1_per_position == record["final_top1_per_position"] and len(run.top1_per_position) == 5
    assert run.heldout_top1_per_position == record["heldout_top1_per_position"] and record["heldout_examples"] == 8
    assert len(run.loss_history) == run.steps and "loss_history" not in record
    assert record["data_config"]["max_new_tokens"] == 12 and record["data_tokens"] > 0 and "command" not in record
    assert run.summary() == (f"drafter written to {run.out / 'drafter'} (4 steps, {record['wall_seconds']} s, "
                             f"final loss {record['final_loss']:.3f}, top-1 per position "
                             f"{record['final_top1_per_position']}, held out {record['heldout_top1_per_position']})")
    saved = mr.load_drafter(run.drafter_path, dtype=mx.float32)  # the file holds the returned drafter (fp16)
    got, want = dict(tree_flatten(saved.parameters())), dict(tree_flatten(run.drafter.parameters()))
    assert got.keys() == want.keys()
    assert all(np.allclose(np.array(got[k]), np.array(want[k]), atol=2e-3, rtol=2e-3) for k in got)


def test_trained_drafter_decodes_losslessly(run, loaded):
    model, tok = loaded
    plain = mr.generate(model, tok, "t5 t6", drafter=None, max_tokens=12)
    assert mr.generate(model, tok, "t5 t6", drafter=run.drafter, max_tokens=12) == plain


def test_train_refuses_bad_settings_in_one_line(run, loaded, tmp_path):
    model, tok = loaded
    with pytest.raises(ValueError) as e:
        mr.train(run.out, model, tok, prompts=PROMPTS, progress=False)
    one_line(e, "already holds a training run", "resume=True")
    with pytest.raises(TypeError, match="not both"):
        mr.train(tmp_path / "x", model, tok, config=mr.TrainConfig(), batch_size=4)
    with pytest.raises(ValueError) as e:
        mr.train(tmp_path / "x", model, tok, prompts=[3], progress=False)
    one_line(e, "prompts must be a list of texts")
    with pytest.raises(TypeError, match="needs its tokenizer"):
        mr.train(tmp_path / "x", model, prompts=PROMPTS)
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_train_on_more_data_from_a_drafter(run, loaded, tmp_path):
    """extra_data joins another run's finished data; init continues a drafter; both are checked before any work."""
    model, tok = loaded
    sampled = mr.train(tmp_path / "s", model, tok, prompts=PROMPTS[:8], max_new_tokens=12, gen_temp=0.7,
                       data_only=True, progress=False)
    more = mr.train(tmp_path / "m", model, tok, prompts=PROMPTS, max_new_tokens=12, gen_batch_size=24,
                    data=run.data_dir, extra_data=[str(sampled.data_dir), run.data_dir, sampled.data_dir],
                    init=run.drafter_path, batch_size=8, max_steps=2, progress=False)
    assert more.metrics["examples"] == 32 and more.metrics["extra_data"] == [str(sampled.data_dir)]  # each folder once
    assert more.drafter.config == run.drafter.config and more.metrics["train_config"]["init"] == str(run.drafter_path)
    assert more.drafter.source == str(tmp_path / "m" / "drafter")
    with pytest.raises(ValueError) as e:
        mr.train(tmp_path / "f", model, tok, prompts=PROMPTS, data=run.data_dir, feature_layers=[1, 7], progress=False)
    one_line(e, "--feature-layers must be below 2", "got 1,7")
    assert not (tmp_path / "f").exists()  # refused before the output folder is made
    for bad, message in [(dict(extra_data=[tmp_path / "none"]), "no distillation data in"),
                         (dict(init=str(tmp_path / "none")), "no drafter at")]:
        with pytest.raises(FileNotFoundError) as e:
            mr.train(tmp_path / "x", model, tok, prompts=PROMPTS, data=run.data_dir, progress=False, **bad)
        one_line(e, message)
    copy = tmp_path / "copy"
    shutil.copytree(run.drafter_path, copy)
    with pytest.raises(UnsafeOutputError, match="source"):
        mr.train(copy, model, tok, prompts=PROMPTS, init=str(copy), progress=False)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in run.drafter_path.iterdir())


def test_train_data_only(loaded, tmp_path):
    model, tok = loaded
    result = mr.train(tmp_path / "d", model, tok, prompts=PROMPTS[:4], max_new_tokens=4, data_only=True, progress=False)
    assert result.drafter is None and result.steps == 0 and (result.data_dir / "manifest.json").exists()
    assert result.summary() == f"distillation data written to {tmp_path / 'd' / 'data'} ({result.data_seconds:.0f} s)"


def test_eval_drafter_returns_the_grid_the_cli_prints(loaded, tmp_path):
    model, tok = loaded
    ev = mr.eval_drafter(model, tok, prompts=PROMPTS[:3], widths=[1, 2], lengths=3, lookup="both", max_tokens=10,
                         out=tmp_path, progress=False)
    rows = acceptance_grid(model, tok, model.drafter, PROMPTS[:3], [1, 2], [3], 10, False, (False, True))
    assert ev.rows == rows and ev.table() == markdown_table(rows) == str(ev)
    assert [(r["width"], r["lookup"]) for r in ev.rows] == [(1, False), (2, False), (1, True), (2, True)]
    assert ev.best["tokens_per_step"] == max(r["tokens_per_step"] for r in rows) > 1  # the echo drafter is accepted
    assert json.loads((tmp_path / "acceptance.json").read_text()) == rows and ev.title.startswith("drafter:")
    decoded = mr.eval_drafter(model, tok, prompts=PROMPTS[:3], widths=[2], lengths=[3], lookup=False, max_tokens=10,
                              decode=True, progress=False)
    assert [(r["steps"], r["tokens"]) for r in decoded.rows] == [(rows[1]["steps"], rows[1]["tokens"])]
    sampled = [mr.eval_drafter(model, tok, prompts=PROMPTS[:3], widths=[2], lengths=[3], lookup=False, max_tokens=10,
                               temperature=0.7, seed=s, progress=False) for s in (1, 1, 2)]
    assert sampled[0].rows == sampled[1].rows and not sampled[0].replay  # counted by decoding, seeded
    assert sampled[0].rows[0]["temperature"] == 0.7 and "T=0.7" in repr(sampled[0]) and "| 0.7 |" in str(sampled[0])
    assert sampled[0].rows[0]["tokens"] == sampled[2].rows[0]["tokens"] == 30
    with pytest.raises(FileExistsError):
        mr.eval_drafter(model, tok, prompts=PROMPTS[:3], out=tmp_path)
    with pytest.raises(ValueError) as e:
        mr.eval_drafter(model, tok, drafter=None, prompts=PROMPTS[:3])
    one_line(e, "no drafter")
    with pytest.raises(ValueError, match="lookup"):
        mr.eval_drafter(model, tok, lookup="sometimes")


def test_benchmark_returns_the_table_the_cli_prints(loaded, tmp_path):
    model, tok = loaded
    b = mr.benchmark(model, tok, prompts=PROMPTS[:2], max_tokens=6, temp=None, mlx_lm_speculative=False,
                     out=tmp_path, tag="t", progress=False)
    assert list(b.summary) == ["mlx-lm plain", "ours plain", "redrafter greedy"]
    assert all(len(v) == 2 and min(v) > 0 for v in b.per_prompt_tps.values())
    assert b.summary["redrafter greedy"]["identical_to_mlx_lm"] == b.summary["ours plain"]["identical_to_mlx_lm"] == 1.0
    assert b.speedup() == b.summary["redrafter greedy"]["speedup_vs_mlx_lm"] and b.prompts == 2
    assert b.table() == speed.markdown(b.record()) == str(b)
    assert json.loads((tmp_path / "speed-t.json").read_text()) == {**b.record(), "sweep": None}
    with pytest.raises(KeyError, match="one of"):
        b.speedup("nope")


@pytest.mark.parametrize("which", ["train", "eval", "benchmark"])
def test_plot_returns_a_figure(which, run, loaded):
    model, tok = loaded
    if which == "train":
        result = run
    elif which == "eval":
        result = mr.eval_drafter(model, tok, prompts=PROMPTS[:2], widths=[2], lengths=[3], max_tokens=6, progress=False)
    else:
        result = mr.benchmark(model, tok, prompts=PROMPTS[:2], max_tokens=4, temp=0.7, mlx_lm_speculative=False,
                              progress=False)
    fig = result.plot()
    import matplotlib.pyplot as plt

    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.number not in plt.get_fignums()  # closed in pyplot: a notebook shows it once, as the cell's value
    if which == "train":
        assert len(fig.axes[0].lines) == 2  # training and held out
        assert list(fig.axes[1].lines[0].get_ydata()) == run.loss_history
    if which == "eval":
        assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].patches) == 2  # lookup off and on
    if which == "benchmark":
        assert len(fig.axes[0].patches) == 2 * 4  # 2 prompts x 4 methods (greedy and sampled ReDrafter)


def test_progress_bars_are_rate_limited():
    bar = progress(range(3), enabled=True, leave=False)
    assert bar.mininterval == MININTERVAL >= 0.5 and list(bar) == [0, 1, 2]
    assert progress(range(2), enabled=False).disable
