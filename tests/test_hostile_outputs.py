"""Nothing the user owns is ever lost (issue 18, items 1 and 5): hostile OUT paths, --force, signals,
stale temporaries, result files, and one-line CLI errors.

Every sandbox is built in tmp_path; the user's files are hashed before and after."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import mlx_redrafter
from conftest import tiny_config, tiny_model
from test_loading import write_model_dir
from mlx_redrafter import outputs
from mlx_redrafter.cli import app
from mlx_redrafter.outputs import MARKER, UnsafeOutputError, atomic_output, sweep_stale

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tree(root: Path) -> dict:
    """Every path under root -> sha256 of its bytes (or 'dir' / 'link -> target')."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(r, code=2, contains=""):
    """Exactly one `error:` line on stderr, the exit code, no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(errors) == 1, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert contains in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Hugging Face-style model directory (config.json, model.safetensors, tokenizer)."""
    config = tiny_config(vocab_size=64)
    return write_model_dir(tmp_path_factory.mktemp("hf") / "hf", tiny_model(config), config)


@pytest.fixture
def sandbox(tmp_path, hf_dir, monkeypatch):
    """tmp_path/sb with hf/, models/hf/ and notes.txt; the current directory."""
    import shutil

    sb = tmp_path / "sb"
    shutil.copytree(hf_dir, sb / "hf")
    shutil.copytree(hf_dir, sb / "models" / "hf")
    (sb / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(sb)
    return sb


def convert(*args):
    return runner.invoke(app, ["convert", "base", *map(str, args)])


# ---- the three repros, and their relatives ----

@pytest.mark.parametrize("src, out, says", [
    ("hf", ".", "the current directory"),  # deleted ./hf and notes.txt
    ("models/hf", "models", "holds the source"),  # deleted the source model and its siblings
    ("hf", "hf", "is the source"),  # replaced the source checkpoint
    ("hf", "hf/..", "the current directory"),
    ("models/hf", "..", "holds the current directory"),
])
def test_out_that_is_or_holds_a_source_or_the_cwd_is_refused(sandbox, src, out, says):
    before = tree(sandbox)
    refused(convert(src, out, "--force"), contains=says)
    assert tree(sandbox) == before


def test_home_and_root_are_refused(sandbox, monkeypatch):
    monkeypatch.setenv("HOME", str(sandbox / "models"))
    before = tree(sandbox)
    refused(convert("hf", sandbox / "models", "--force"), contains="home directory")
    refused(convert("hf", "/", "--force"), contains="root directory")
    assert tree(sandbox) == before


def test_symlink_to_the_source_is_refused(sandbox):
    (sandbox / "link").symlink_to(sandbox / "hf", target_is_directory=True)
    before = tree(sandbox)
    refused(convert("hf", "link", "--force"), contains="is the source")
    assert tree(sandbox) == before


def test_force_does_not_replace_a_users_folder_or_file(sandbox):
    (sandbox / "mine").mkdir()
    (sandbox / "mine" / "thesis.tex").write_text("years of work")
    before = tree(sandbox)
    refused(convert("hf", "mine", "--force"), contains="remove it yourself or choose another")
    refused(convert("hf", "mine"), contains="pass --force")
    refused(convert("hf", "notes.txt", "--force"), contains="is a file")
    assert tree(sandbox) == before


def test_force_replaces_what_convert_wrote_and_empty_folders(sandbox):
    r = convert("hf", "out", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    marker = json.loads((sandbox / "out" / MARKER).read_text())
    assert marker["written_by"] == "mlx-redrafter" and marker["what"] == "convert base"
    (sandbox / "out" / ".DS_Store").write_bytes(b"\0")  # a file browser's, not the user's work
    before = tree(sandbox / "hf")
    r = convert("hf", "out", "--force")
    assert r.exit_code == 0, r.output
    assert (sandbox / "out" / "config.json").exists() and not (sandbox / "out" / ".DS_Store").exists()
    assert json.loads((sandbox / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    (sandbox / "empty").mkdir()
    assert convert("hf", "empty", "--force").exit_code == 0
    assert (sandbox / "empty" / MARKER).exists()
    assert tree(sandbox / "hf") == before
    assert not [p for p in sandbox.iterdir() if ".partial." in p.name or ".old." in p.name]


def test_force_keeps_files_added_to_a_folder_convert_wrote(sandbox):
    assert convert("hf", "out").exit_code == 0
    (sandbox / "out" / "notes").mkdir()
    (sandbox / "out" / "notes" / "mine.txt").write_text("my notes on this model")
    before = tree(sandbox)
    refused(convert("hf", "out", "--force"), contains="added after mlx-redrafter wrote it (notes, notes/mine.txt)")
    assert tree(sandbox) == before
    # a marker without the list of files (an earlier version's) cannot tell the user's files from ours
    marker = json.loads((sandbox / "out" / MARKER).read_text())
    del marker["files"]
    (sandbox / "out" / MARKER).write_text(json.dumps(marker))
    shutil.rmtree(sandbox / "out" / "notes")
    refused(convert("hf", "out", "--force"), contains="did not write")


def test_a_drafter_saved_by_an_earlier_version_is_still_replaced(sandbox):
    """Its marker has no list of files, but it holds exactly a drafter (a resumed training saves over it)."""
    from conftest import tiny_drafter
    from mlx_redrafter.drafter import save_drafter

    drafter = tiny_drafter(tiny_model(tiny_config(vocab_size=64)))
    save_drafter(drafter, sandbox / "d")
    marker = json.loads((sandbox / "d" / MARKER).read_text())
    del marker["files"]
    (sandbox / "d" / MARKER).write_text(json.dumps(marker))
    save_drafter(drafter, sandbox / "d")
    (sandbox / "d" / "mine.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match=r"added after mlx-redrafter wrote it \(mine.txt\)"):
        save_drafter(drafter, sandbox / "d")


def test_drafter_output_is_checked_too(sandbox, hf_dir):
    from conftest import tiny_drafter
    from mlx_redrafter.drafter import save_drafter

    base = tiny_model(tiny_config(vocab_size=64))
    (sandbox / "mine").mkdir()
    (sandbox / "mine" / "config.json").write_text("{}")
    before = tree(sandbox)
    with pytest.raises(UnsafeOutputError, match="did not write"):
        save_drafter(tiny_drafter(base), sandbox / "mine")
    with pytest.raises(UnsafeOutputError, match="current directory"):
        save_drafter(tiny_drafter(base), ".")
    assert tree(sandbox) == before
    save_drafter(tiny_drafter(base), sandbox / "d")
    src = sandbox / "d" / "model.safetensors"
    r = runner.invoke(app, ["convert", "drafter", str(src), str(sandbox / "d"), "--force"])
    refused(r, contains="holds the source")


# ---- failures and signals ----

def test_failure_midway_keeps_the_old_output_whole(sandbox, monkeypatch):
    assert convert("hf", "out").exit_code == 0
    before = tree(sandbox)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("mlx_redrafter.convert._validate", broken)
    refused(convert("hf", "out", "--force"), contains="disk full")
    assert tree(sandbox) == before


def test_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "a").write_text("old")
    real_rename = os.rename

    def rename(a, b):
        if ".partial." in str(a):
            raise OSError("rename failed")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_output(out, force=True) as tmp:
            (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlx_redrafter.convert as convert

    READY = Path(sys.argv[1])

    def slow_validate(path, config, src):  # inside the partial folder, before the swap
        READY.write_text(str(path))
        time.sleep(120)

    convert._validate = slow_validate
    from mlx_redrafter.cli import app
    sys.argv = ["mlx-redrafter"] + sys.argv[2:]
    app()
""")


def test_sigterm_mid_write_removes_the_partial_folder(sandbox):
    assert convert("hf", "out").exit_code == 0  # an earlier output that must survive
    before = tree(sandbox)
    script, ready = sandbox.parent / "slow_convert.py", sandbox.parent / "ready"
    script.write_text(SLOW_CONVERT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(ready), "convert", "base", "hf", "out", "--force"],
                             cwd=sandbox, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists():
        assert child.poll() is None and time.time() < deadline, child.communicate()
        time.sleep(0.05)
    partial = Path(ready.read_text())
    assert partial.exists() and ".out.partial." in partial.name
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert b"Traceback" not in err
    assert not partial.exists() and tree(sandbox) == before


def test_stale_partial_and_old_folders_are_swept(sandbox):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = sandbox / f".out.partial.{dead.pid}.0123abcd"
    stale.mkdir()
    outputs.write_marker(stale, "convert base")
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    foreign = sandbox / f".out.partial.{dead.pid}.fedc0000"  # not ours (no marker): left alone
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not yours")
    alive = sandbox / f".out.partial.{os.getppid()}.00000000"  # a running writer's: left alone
    alive.mkdir()
    outputs.write_marker(alive, "convert base")
    r = convert("hf", "out")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and (foreign / "keep.txt").exists() and alive.exists()


def test_old_output_renamed_aside_by_a_killed_run_is_put_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.old.{dead.pid}.0badc0de"
    old.mkdir()
    outputs.write_marker(old, "convert base")
    (old / "config.json").write_text("{}")
    sweep_stale(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and not old.exists()


# ---- checkpoints and train --out ----

def test_save_checkpoint_swaps_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    import mlx.optimizers as optim

    from conftest import tiny_drafter
    from mlx_redrafter import training

    base = tiny_model(tiny_config(vocab_size=64))
    drafter, opt = tiny_drafter(base), optim.AdamW(1e-3)
    path = tmp_path / "run" / "checkpoint"
    path.parent.mkdir()
    training.save_checkpoint(path, drafter, opt, 3, {})
    assert json.loads((path / "state.json").read_text())["step"] == 3
    before = tree(tmp_path)
    real = mx.save_safetensors

    def failing(name, *a, **k):
        if name.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(name, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(path, drafter, opt, 4, {})
    assert tree(tmp_path) == before  # the step-3 checkpoint is whole, nothing left beside it
    monkeypatch.setattr(mx, "save_safetensors", real)
    training.save_checkpoint(path, drafter, opt, 5, {})
    assert json.loads((path / "state.json").read_text())["step"] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "state.json").write_text("mine")
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError):
        training.save_checkpoint(user, drafter, opt, 1, {})
    assert (user / "notes.txt").read_text() == "mine"


def test_train_out_is_checked_before_any_work(sandbox, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mlx_redrafter, "load", never)
    (sandbox / "p.jsonl").write_text('{"prompt": "t3 t4"}\n')
    before = tree(sandbox)
    r = runner.invoke(app, ["train", "--out", ".", "--prompts", "p.jsonl", "--model", "hf"])
    refused(r, contains="current directory")
    r = runner.invoke(app, ["train", "--out", "hf", "--prompts", "p.jsonl", "--model", "hf"])
    refused(r, contains="is the source")
    r = runner.invoke(app, ["train", "--out", "models", "--prompts", "p.jsonl"])
    refused(r, contains="did not write")
    assert tree(sandbox) == before


# ---- result files ----

def test_benchmark_results_are_not_overwritten_without_force(tmp_path):
    from mlx_redrafter import speed as benchmark

    result = {"machine": "m", "dtype": "float32", "prompts": 1, "max_tokens": 1, "beam": [1, 2], "lookup": False,
              "summary": {}}
    benchmark.save(result, None, tmp_path, "cpu")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"speed-cpu.json already exists: pass --force .* another --out"):
        benchmark.save({**result, "machine": "other"}, None, tmp_path, "cpu")
    assert tree(tmp_path) == before
    benchmark.save({**result, "machine": "other"}, None, tmp_path, "cpu", force=True)
    assert json.loads((tmp_path / "speed-cpu.json").read_text())["machine"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed-cpu.json", "speed-cpu.md"]


def test_eval_results_are_not_overwritten_without_force(tmp_path):
    from mlx_redrafter.beam_search import BeamShape
    from mlx_redrafter.evaluate import save_results, summary

    rows = [summary(BeamShape(1, 2), 1, 3, [1, 0])]
    save_results(rows, tmp_path, "acceptance", "t")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="acceptance.json already exists"):
        save_results(rows, tmp_path, "acceptance", "t")
    assert tree(tmp_path) == before
    save_results(rows, tmp_path, "acceptance", "t", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acceptance.json", "acceptance.md", "acceptance.png"]


def test_result_commands_refuse_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "acceptance.json").write_text("earlier")
    (tmp_path / "speed-cpu.md").write_text("earlier")
    before = tree(tmp_path)
    r = runner.invoke(app, ["eval-drafter", "--out", str(tmp_path)])
    refused(r, contains="acceptance.json already exists: pass --force")
    r = runner.invoke(app, ["benchmark", "--out", str(tmp_path), "--tag", "cpu"])
    refused(r, contains="speed-cpu.md already exists: pass --force")
    assert tree(tmp_path) == before


def test_stale_partial_result_files_are_swept(tmp_path):
    """`.NAME.partial.<pid>.<hex>` files a kill -9 left: swept once their writer's pid is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".speed-cpu.json.partial.{dead.pid}.0123abcd"
    stale.write_text("half a result")
    alive = tmp_path / f".speed-cpu.json.partial.{os.getppid()}.00000000"  # a running writer's: left alone
    alive.write_text("being written")
    other = tmp_path / f".notes.txt.partial.{dead.pid}.0123abcd"  # another file's: not ours to sweep here
    other.write_text("x")
    folder = tmp_path / f".speed-cpu.json.partial.{dead.pid}.fedc0000"  # a folder: not a result file
    folder.mkdir()
    outputs.write_file(tmp_path / "speed-cpu.json", "{}")
    assert (tmp_path / "speed-cpu.json").read_text() == "{}"
    assert not stale.exists() and alive.exists() and other.exists() and folder.is_dir()


def test_sigterm_while_writing_a_result_file_removes_the_partial_file(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        from mlx_redrafter.outputs import atomic_file
        with atomic_file({str(tmp_path / "r.json")!r}) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_distill_manifest_is_written_atomically(tmp_path, monkeypatch):
    """A failure while the manifest is rewritten leaves the old one whole (it used to be truncated in place)."""
    from mlx_redrafter import distill

    cfg = distill.DataConfig()
    distill.make_distillation_data(None, None, [], tmp_path, cfg, progress=False)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text())))  # same content, other layout
    before = tree(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        distill.make_distillation_data(None, None, [], tmp_path, cfg, progress=False)
    assert tree(tmp_path) == before


def test_malformed_distill_manifest_is_one_line(tmp_path):
    from mlx_redrafter import distill

    (tmp_path / "manifest.json").write_text("{truncated")
    with pytest.raises(ValueError) as e:
        distill.make_distillation_data(None, None, [], tmp_path, distill.DataConfig(), progress=False)
    assert str(tmp_path / "manifest.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["base", "drafter"])
def test_unknown_convert_dtype_lists_the_accepted_ones(sandbox, monkeypatch, command):
    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    before = tree(sandbox)
    r = runner.invoke(app, ["convert", command, "hf", "out", "--dtype", "float8", "--base", "x"][: 6 if command == "base" else 8])
    refused(r, contains="unknown dtype 'float8': use one of float16, bfloat16, float32")
    assert tree(sandbox) == before


# ---- one-line CLI errors (item 5) ----

class Piece:
    def __init__(self, text):
        self.text, self.from_draft, self.step_accepted = text, False, 0


def test_typer_exit_gives_exactly_one_error_line():
    r = runner.invoke(app, ["eval-drafter", "--widths", "a,b"])
    refused(r, contains="--widths must be a comma-separated list")
    assert "error: 2" not in r.output


def test_ctrl_c_in_generate_keeps_the_text_and_exits_130(monkeypatch):
    def stream(*a, **k):
        yield Piece("Hello")
        yield Piece(" world")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(mlx_redrafter, "stream_generate", stream)
    r = runner.invoke(app, ["generate", "-p", "hi", "--autoregressive"])
    assert r.exit_code == 130 and r.stdout == "Hello world\n", r.output
    assert r.stderr.strip() == "interrupted" and "error:" not in r.output


def test_ctrl_c_in_train_exits_130_with_one_line(tmp_path, monkeypatch):
    import mlx_redrafter.distill as distill
    import mlx_redrafter.loading as loading
    import mlx_redrafter.training as training

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(distill, "make_distillation_data", lambda *a, **k: None)
    monkeypatch.setattr(training, "sequences_for", lambda *a, **k: [])
    monkeypatch.setattr(training, "fit", interrupted)
    monkeypatch.setattr(training, "check_inputs", lambda *a, **k: None)  # no base model here to check against
    (tmp_path / "p.jsonl").write_text('{"prompt": "t3 t4"}\n')
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--prompts", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 130, r.output
    assert "rerun with --resume" in r.stderr and "error:" not in r.output
    monkeypatch.setattr(distill, "make_distillation_data", interrupted)  # Ctrl-C anywhere else
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--prompts", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", r.output


@pytest.mark.parametrize("exc, says", [(MemoryError(), "out of memory"),
                                       (OverflowError("int too large to convert"), "int too large")])
def test_memory_and_overflow_errors_are_one_line(monkeypatch, exc, says):
    def fails(*a, **k):
        raise exc

    monkeypatch.setattr(mlx_redrafter, "load", fails)
    refused(runner.invoke(app, ["generate", "-p", "hi"]), contains=says)


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_out_of_range_is_one_line(monkeypatch, seed):
    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    refused(runner.invoke(app, ["generate", "-p", "hi", "--seed", seed]), contains="--seed must be between 0 and")


def test_latin1_stdin_is_one_line(monkeypatch):
    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = runner.invoke(app, ["generate", "-p", "-"], input=b"caf\xe9 au lait\n")
    refused(r, contains="standard input is not UTF-8 text (byte 0xe9 at offset 3)")


def test_prompt_records_that_are_not_text_are_named(tmp_path):
    from mlx_redrafter.data import read_conversations

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: record 2 is not usable: its prompt is int 42, not text"):
        read_conversations(path)
    path.write_text('[{"turns": [{"a": 1}]}]')
    with pytest.raises(ValueError, match=r"record 1 .* first turn is dict"):
        read_conversations(path)
    path.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        read_conversations(path)
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_conversations(path)
    path.write_text('{"turns": "Hello there"}\n')
    assert read_conversations(path)[0].prompt == "Hello there"


@pytest.mark.parametrize("args, says", [
    (["generate", "-p", "hi", "-W", "129"], "--beam-width"),
    (["generate", "-p", "hi", "-L", "17"], "--beam-length"),
    (["benchmark", "-W", "129"], "--beam-width"),
    (["benchmark", "-L", "17"], "--beam-length"),
    (["benchmark", "--sweep-widths", "1,129"], "--sweep-widths needs integers in 1..128"),
    (["benchmark", "--sweep-widths", "1", "--sweep-lengths", "1,2"], "--sweep-lengths needs integers in 2..16"),
    (["eval-drafter", "--widths", "129"], "--widths needs integers in 1..128"),
    (["eval-drafter", "--lengths", "17"], "--lengths needs integers in 2..16"),
    (["generate", "-p", "hi", "--lookup-length", "17"], "--lookup-length"),
    (["benchmark", "--lookup-length", "-1"], "--lookup-length"),
    (["eval-drafter", "--lookup-length", "17"], "--lookup-length"),
    (["generate", "-p", "hi", "--no-lookup", "--lookup-length", "8"], "needs the context-lookup beam"),
    (["benchmark", "--no-lookup", "--lookup-length", "8"], "needs the context-lookup beam"),
    (["eval-drafter", "--lookup", "off", "--lookup-length", "8"], "needs the context-lookup beam"),
    (["generate", "-p", "hi", "--min-prob", "1"], "--min-prob"),
    (["benchmark", "--min-prob", "-0.1"], "--min-prob"),
    (["generate", "-p", "hi", "--min-prob", "nan"], "--min-prob"),
])
def test_beam_shape_is_bounded_on_every_command(monkeypatch, tmp_path, args, says):
    monkeypatch.setattr(mlx_redrafter, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = runner.invoke(app, args + (["--out", str(tmp_path)] if args[0] != "generate" else []))
    assert r.exit_code == 2 and says in r.output, r.output
    assert "Traceback" not in r.output


def test_ctrl_c_or_an_error_under_a_progress_bar_starts_its_own_line(tmp_path, monkeypatch):
    """The bar's line is ended first: `interrupted` / `error: ...` never lands on the end of the bar."""
    import mlx_redrafter.distill as distill
    import mlx_redrafter.loading as loading
    from mlx_redrafter.progress import progress

    def stopped_under_a_bar(error):
        def run(*a, **k):
            bar = progress(total=10, desc="distillation data")
            bar.update(3)
            bar.refresh()
            raise error
        return run

    import mlx_redrafter.training as training

    monkeypatch.setattr(loading, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(training, "check_inputs", lambda *a, **k: None)  # no base model here to check against
    (tmp_path / "p.jsonl").write_text('{"prompt": "t3 t4"}\n')
    for error, line, code in [(KeyboardInterrupt(), "interrupted", 130), (OSError("disk full"), "error: disk full", 2)]:
        monkeypatch.setattr(distill, "make_distillation_data", stopped_under_a_bar(error))
        r = runner.invoke(app, ["train", "--out", str(tmp_path / f"run{code}"), "--prompts", str(tmp_path / "p.jsonl")])
        assert r.exit_code == code, r.output
        assert line in r.stderr.splitlines() and "distillation data" in r.stderr, repr(r.stderr)


def _screen(text: str) -> list:
    """What a terminal shows for `text`: newline, carriage return, cursor up (ESC [ A) and plain characters."""
    rows, row, col, i = [[]], 0, 0, 0
    while i < len(text):
        if text.startswith("\x1b[A", i):
            row, i = max(row - 1, 0), i + 3
            continue
        ch, i = text[i], i + 1
        if ch == "\n":
            row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
        elif ch == "\r":
            col = 0
        else:
            line = rows[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col], col = ch, col + 1
    return ["".join(r).rstrip() for r in rows]


def test_closing_nested_bars_leaves_the_cursor_at_the_start_of_a_fresh_line():
    """An outer bar and an inner leave=False bar, both live: the next message is a line of its own."""
    import io

    from mlx_redrafter.progress import close_bars, progress

    stream = io.StringIO()
    outer = progress(total=4, desc="settings", file=stream)
    inner = progress(total=8, desc="prompts", file=stream, leave=False)
    outer.update(1), inner.update(3), outer.refresh(), inner.refresh()
    close_bars()
    stream.write("error: stopped\n")
    shown = _screen(stream.getvalue())
    assert "error: stopped" in shown, shown
    assert any(line.startswith("settings") for line in shown) and not any("prompts" in line for line in shown), shown


def test_resume_with_nothing_to_resume_is_refused_and_out_is_expanded(tmp_path, monkeypatch):
    """`--out=~/run --resume` (the shell leaves ~ alone after =): a typo'd folder started a new run silently,
    and ~ was expanded for the folder but not for its data."""
    monkeypatch.setenv("HOME", str(tmp_path))
    r = runner.invoke(app, ["train", "--out=~/nothing", "--resume"])
    assert r.exit_code == 2, r.output
    assert f"--resume: {tmp_path / 'nothing'} holds no checkpoint and {tmp_path / 'nothing' / 'data'} no data" in r.stderr
    assert not (tmp_path / "nothing").exists() and not Path("~").exists()


def test_a_bad_prompt_file_leaves_no_output_folder(tmp_path, monkeypatch):
    """The prompt file was read after OUT was made, so each bad one left OUT/.mlx-redrafter behind."""
    import mlx_redrafter.loading as loading
    import mlx_redrafter.training as training

    monkeypatch.setattr(loading, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(training, "check_inputs", lambda *a, **k: None)  # no base model here to check against
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--prompts", str(tmp_path / "bad.jsonl")])
    assert r.exit_code == 2 and r.stderr.startswith("error: "), r.output
    assert not (tmp_path / "run").exists()
