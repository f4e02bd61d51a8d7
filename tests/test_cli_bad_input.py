"""Bad input through the command line, end to end: one `error:` line naming the file and the fix,
and Ctrl-C during generation keeping the text generated so far."""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, tiny_drafter, tiny_model
from test_loading import write_model_dir
from mlx_redrafter.cli import app
from mlx_redrafter.drafter import save_drafter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = tiny_config(vocab_size=64, max_position_embeddings=1 << 20)
    base = tiny_model(config)
    path = write_model_dir(tmp_path_factory.mktemp("cli") / "m", base, config)
    save_drafter(tiny_drafter(base, "proj"), path / "drafter")
    return path


def error_line(args, *needles):
    """Run the CLI; it must fail with exactly one `error:` line holding every needle."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def generate_with(model_dir, drafter):
    return ["generate", "-m", model_dir, "-d", drafter, "-p", "t3 t4", "--no-chat-template", "-n", "3"]


def copy_drafter(model_dir, to: Path) -> Path:
    to.mkdir()
    for f in ("config.json", "model.safetensors"):
        (to / f).write_bytes((model_dir / "drafter" / f).read_bytes())
    return to


def test_malformed_drafter_config_names_the_file(model_dir, tmp_path):
    d = copy_drafter(model_dir, tmp_path / "d")
    (d / "config.json").write_text('{"exit_dim": 1 "vocab_size": 64}')
    error_line(generate_with(model_dir, d), d / "config.json", "not valid JSON")


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_truncated_drafter_weights_name_the_file(model_dir, tmp_path, keep):
    d = copy_drafter(model_dir, tmp_path / "d")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    error_line(generate_with(model_dir, d), weights, "truncated or corrupt")


def test_drafter_for_another_model_says_so(model_dir, tmp_path):
    other = tiny_model(tiny_config(vocab_size=64, hidden_size=64))
    save_drafter(tiny_drafter(other, "proj"), tmp_path / "d")
    message = error_line(generate_with(model_dir, tmp_path / "d"), "was made for another model", "hidden_size=64")
    assert "input_proj" not in message


@pytest.mark.parametrize("name, data", [("p.jsonl", b"\x9c\x00\xff binary"), ("p.jsonl.gz", b"\x1f\x8b\x08 truncated"),
                                        ("p.json.gz", b"not gzip at all"),
                                        ("q.jsonl.gz", gzip.compress("\xff".encode("latin-1")))])
def test_binary_prompts_file_names_the_file(model_dir, tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    error_line(["benchmark", "-m", model_dir, "--prompts", tmp_path / name, "--out", tmp_path / "out",
                "--no-mlx-lm-spec"], tmp_path / name)


def test_prompts_folder_gzip_bomb_and_output_under_a_file_are_refused_up_front(model_dir, tmp_path, monkeypatch):
    from mlx_redrafter import data

    monkeypatch.setattr(data, "MAX_UNZIPPED", 1000)
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "' + b"a" * 5000 + b'"}\n'))
    (tmp_path / "notes.txt").write_text("mine")
    args = ["eval-drafter", "-m", model_dir, "--out", tmp_path / "out", "--widths", "2", "--lengths", "2"]
    error_line(args + ["--prompts", tmp_path], "is a folder: give a prompts file")
    error_line(args + ["--prompts", tmp_path / "big.jsonl.gz"], "unpacks to over")
    error_line(["eval-drafter", "-m", model_dir, "--out", tmp_path / "notes.txt"], "notes.txt is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [(["generate", "-p", "t3", "--top-p", "2"], "Invalid value for '--top-p'"),
                                          (["generat", "-p", "t3"], "No such command 'generat'")])
def test_usage_errors_are_one_line_from_the_real_command(args, needle):
    """Typer's own checks, as the installed command prints them (CliRunner bypasses `main`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mlx_redrafter", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr


def test_a_reader_that_goes_away_ends_generation_quietly(model_dir):
    """`generate ... | head -c 12`: no error line for a closed pipe (it said `error: [Errno 32] Broken pipe`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "mlx_redrafter", *generate_with(model_dir, model_dir / "drafter")[:-1],
                          "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    p.stdout.read(12)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 1 and "error" not in err and "Traceback" not in err, err


def test_an_empty_model_or_drafter_path_is_named(model_dir):
    error_line(["generate", "-m", "", "-p", "t3"], "the model path is empty")
    error_line(["generate", "-m", model_dir, "-d", " ", "-p", "t3"], "the drafter path is empty")
    for command in (["generate", "-p", "t3"], ["eval-drafter"], ["benchmark"]):
        error_line([*command, "-m", model_dir, "-d", ""], "the drafter path is empty")  # not the packaged one


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_top_p_zero_is_refused_as_generate_refuses_it(model_dir, command):
    """`--top-p 0` silently meant 1.0 (no nucleus cut at all) in serve and chat."""
    assert "top-p must be in (0, 1]" in error_line(["generate", "-m", model_dir, "-p", "t3", "--top-p", "0"])
    assert "top-p must be in (0, 1]" in error_line([command, "-m", model_dir, "--top-p", "0"])


def test_ctrl_c_during_generation_keeps_the_text(model_dir):
    """A real SIGINT to the command: the text so far stays on stdout, one line on stderr, exit 130."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a test runner started as a background job has SIGINT ignored, and the command would inherit that
    p = subprocess.Popen([sys.executable, "-m", "mlx_redrafter", *generate_with(model_dir, model_dir / "drafter")[:-1],
                          "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.read(12)  # generation has started
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    text, err = (first + out).decode(), err.decode()
    assert p.returncode == 130, err
    words = text.split()
    assert len(words) >= 3 and all(w.startswith("t") for w in words) and text.endswith("\n")
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_an_empty_feature_layers_list_is_refused(tmp_path):
    """`--feature-layers ""` silently meant the default layout."""
    error_line(["train", "--out", tmp_path / "run", "--feature-layers", ""], "--feature-layers needs integers >= 0")
    assert not (tmp_path / "run").exists()
