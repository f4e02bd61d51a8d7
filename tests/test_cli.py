"""The command line: generate (plain and speculative), train, eval-drafter, and one-line errors."""

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_config, tiny_model
from test_loading import write_model_dir
from mlx_redrafter.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_generate_default_model_with_packaged_drafter(default_model):
    r = run("generate", "-p", "What is the capital of France?", "-n", "20", "--verbose")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output and "Generation: " in r.output and "tokens-per-sec" in r.output
    assert "mean tokens per step" in r.output and "Accepted drafted tokens per step" in r.output
    plain = run("generate", "-p", "What is the capital of France?", "-n", "20", "--autoregressive")
    text = lambda out: [l for l in out.split("==========")[0].splitlines() if not l.startswith("note:")]  # noqa: E731
    assert text(plain.output) == text(r.output)  # same text (notes go to stderr)
    long_lookup = run("generate", "-p", "What is the capital of France?", "-n", "20", "--lookup-length", "9")
    assert long_lookup.exit_code == 0 and text(long_lookup.output) == text(plain.output)
    lookup_beams = run("generate", "-p", "What is the capital of France?", "-n", "20", "--lookup-beams", "3")
    assert lookup_beams.exit_code == 0 and text(lookup_beams.output) == text(plain.output)
    for min_prob in ("0", "0.5"):  # every drafted node of the budget, and only the likely ones
        cut = run("generate", "-p", "What is the capital of France?", "-n", "20", "--min-prob", min_prob)
        assert cut.exit_code == 0 and text(cut.output) == text(plain.output)


def test_bad_input_gives_one_line_errors():
    r = run("generate", "-p", "hi", "--model", "./no/such/model")
    assert r.exit_code == 2 and r.output.strip() == "error: model not found: ./no/such/model is neither a local path nor a Hub id (org/name)"
    r = run("generate", "-p", "hi", "--beam-width", "0")
    assert r.exit_code == 2 and "--beam-width" in r.output
    r = run("generate", "-p", "hi", "--lookup-beams", "2", "--no-lookup")
    assert r.exit_code == 2 and r.output.strip() == ("error: lookup beams need the context lookup: drop --no-lookup "
                                                     "(lookup=False) or the lookup beams")
    r = run("generate", "-p", "hi", "--dtype", "float8")
    assert r.exit_code == 2 and "unknown dtype 'float8'" in r.output
    r = run("eval-drafter", "--widths", "a,b")
    assert r.exit_code == 2 and "--widths must be a comma-separated list" in r.output


def test_model_without_drafter_falls_back_with_a_hint(tmp_path):
    config = tiny_config(vocab_size=64)
    path = write_model_dir(tmp_path / "m", tiny_model(config), config)
    r = run("generate", "-p", "t3 t4", "--model", str(path), "--no-chat-template", "-n", "5")
    assert r.exit_code == 0 and "no drafter for this model" in r.output and "mlx-redrafter train" in r.output


def test_train_then_evaluate_end_to_end(tmp_path):
    config = tiny_config(vocab_size=64)
    model_dir = write_model_dir(tmp_path / "m", tiny_model(config, scale=2.0), config)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1}"}) + "\n" for i in range(2, 34)))
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--batch-size", "8", "--epochs", "2", "--head", "full", "--exit-dim", "32", "--layers", "1", "--gen-batch-size", "16"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert (out / "drafter" / "model.safetensors").exists() and (out / "checkpoint" / "state.json").exists()
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 8 and record["data_tokens"] > 0 and record["command"].startswith("mlx-redrafter train")
    again = run(*args)
    assert again.exit_code == 2 and "--resume" in again.output
    assert run(*args, "--resume").exit_code == 0
    r = run("eval-drafter", "--model", str(model_dir), "--drafter", str(out), "--prompts", str(prompts), "--limit", "3",
            "--widths", "1,2", "--lengths", "3", "--max-tokens", "8", "--lookup", "both", "--out", str(tmp_path / "eval"))
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval" / "acceptance.json").read_text())
    assert [(x["width"], x["length"], x["lookup"]) for x in rows] == [(1, 3, False), (2, 3, False), (1, 3, True), (2, 3, True)]
    assert (tmp_path / "eval" / "acceptance.png").exists()


def test_benchmark_reports_prefill_beside_mlx_lm(tmp_path):
    config = tiny_config(vocab_size=64)
    model_dir = write_model_dir(tmp_path / "m", tiny_model(config), config)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i + 2}"}) + "\n" for i in range(2, 5)))
    r = run("benchmark", "--model", str(model_dir), "--prompts", str(prompts), "--limit", "2", "--max-tokens", "4",
            "--no-mlx-lm-spec", "--prefill-tokens", "100", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert "Prefill of a 100-token prompt: ours" in r.output and "mlx-lm" in r.output
    prefill = json.loads((tmp_path / "out" / "speed-cpu.json").read_text())["prefill"]
    assert prefill["tokens"] == 100 and all(t > 0 for v in prefill["tps"].values() for t in v)
    assert "Prefill of a 100-token prompt" in (tmp_path / "out" / "speed-cpu.md").read_text()


def test_command_line_repeats_list_options_and_leaves_out_unused_ones():
    from mlx_redrafter.cli import INIT_KEEPS, command_line

    params = {"out": Path("o"), "extra_data": [Path("a"), Path("b")], "head": "shared", "resume": False, "all_turns": True}
    assert command_line("train", params, INIT_KEEPS) == "mlx-redrafter train --out o --extra-data a --extra-data b --all-turns"
    assert "--head shared" in command_line("train", params)
