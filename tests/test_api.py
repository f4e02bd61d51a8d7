"""The notebook API in mlx-lm's shapes: `model, tokenizer = load(dir)` attaches the model's drafter,
`generate` is speculative by default and lossless, `drafter=None` / `speculative=False` decode plainly,
mlx-lm's argument names work, and every public name documents itself with an example."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_redrafter as mr
from conftest import tiny_config, tiny_drafter, tiny_model
from mlx_redrafter.drafter import save_drafter
from test_loading import write_model_dir

VOCAB = 64
PROMPT = [3, 4, 5, 6]
N = 40


def echo_drafter(base):
    """A drafter that agrees with `base` wherever base repeats its last token: it reads the base
    model's hidden state h straight into the base model's LM head (input_proj = [I 0], ResBlocks off),
    so it drafts g0 again and again. The tiny model below repeats one token, so every draft is accepted."""
    drafter = tiny_drafter(base, "shared-head")
    H = base.args.hidden_size
    drafter.input_proj.weight = mx.concatenate([mx.eye(H), mx.zeros((H, H))], axis=1)
    drafter.input_proj.bias = mx.zeros((H,))
    for block in drafter.lm_head:
        block.linear.weight = mx.zeros_like(block.linear.weight)
        block.linear.bias = mx.full(block.linear.bias.shape, -30.0)  # SiLU(-30) ~ 0: x passes through
    mx.eval(drafter.parameters())
    return drafter


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory with a tiny drafter saved as its drafter/."""
    config = tiny_config(vocab_size=VOCAB)
    base = tiny_model(config, scale=4.0)
    path = write_model_dir(tmp_path_factory.mktemp("api") / "m", base, config)
    save_drafter(echo_drafter(base), path / "drafter")
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = mr.load(model_dir, dtype="float32")
    tok._eos_token_ids = set()  # run the full length: the comparisons below are token for token
    return model, tok


def tokens(responses):
    return [r.token for r in responses]


def test_load_returns_two_values_and_attaches_the_drafter(model_dir, loaded):
    model, tok = loaded
    assert isinstance(model.drafter, mr.Drafter)
    assert model.config["vocab_size"] == VOCAB and model.args.vocab_size == VOCAB
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert names and not any("drafter" in k for k in names)  # a plain attribute, not a child module
    assert mr.find_drafter(str(model_dir)) == model_dir / "drafter"


def test_return_config_gives_three_values(model_dir):
    model, tok, config = mr.load(model_dir, dtype="float32", return_config=True)
    assert config is model.config and config["num_hidden_layers"] == 2 and model.drafter is not None


def test_drafter_argument_of_load(model_dir, tmp_path, loaded):
    assert mr.load(model_dir, drafter=None)[0].drafter is None
    other = tmp_path / "other"
    save_drafter(tiny_drafter(loaded[0], "no-rnn", seed=5), other)
    assert mr.load(model_dir, drafter=str(other))[0].drafter.config.rnn is False
    given = tiny_drafter(loaded[0], "proj", seed=2)
    assert mr.load(model_dir, drafter=given)[0].drafter is given
    with pytest.raises(FileNotFoundError, match="no drafter at"):
        mr.load(model_dir, drafter=tmp_path / "missing")


def test_a_model_without_a_drafter_decodes_plainly(tmp_path):
    config = tiny_config(vocab_size=VOCAB)
    model, tok = mr.load(write_model_dir(tmp_path / "bare", tiny_model(config), config), dtype="float32")
    assert model.drafter is None
    rs = list(mr.stream_generate(model, tok, PROMPT, max_tokens=6))
    assert not rs[-1].speculative and rs[-1].steps == rs[-1].generation_tokens


def test_generate_is_speculative_by_default_and_lossless(loaded):
    model, tok = loaded
    spec = list(mr.stream_generate(model, tok, PROMPT, max_tokens=N))
    plain = list(mr.stream_generate(model, tok, PROMPT, max_tokens=N, drafter=None))
    off = list(mr.stream_generate(model, tok, PROMPT, max_tokens=N, speculative=False))
    assert spec[-1].speculative and spec[-1].generation_tokens == N
    assert spec[-1].steps < N and any(r.from_draft for r in spec)  # drafted tokens were accepted
    drafted = list(mr.stream_generate(model, tok, PROMPT, max_tokens=N, beam=mr.BeamShape(2, 4, lookup=False)))
    assert drafted[-1].steps <= N // 3 and tokens(drafted) == tokens(plain)  # the drafter's own, no lookup
    assert not plain[-1].speculative and plain[-1].steps == N and not any(r.from_draft for r in plain)
    assert tokens(spec) == tokens(plain) == tokens(off)
    assert mr.generate(model, tok, PROMPT, max_tokens=N) == mr.generate(model, tok, PROMPT, max_tokens=N, drafter=None)
    assert all(hasattr(spec[-1], k) for k in ("generation_tokens", "steps", "generation_tps", "from_draft"))


def test_drafter_and_beam_can_be_given_per_call(loaded):
    model, tok = loaded
    plain = tokens(mr.stream_generate(model, tok, PROMPT, max_tokens=N, drafter=None))
    other = tiny_drafter(model, "shared-head", seed=3)
    rs = list(mr.stream_generate(model, tok, mx.array(PROMPT), max_tokens=N, drafter=other,
                                 beam=mr.BeamShape(2, 3, lookup=False)))
    assert rs[-1].speculative and tokens(rs) == plain


def test_mlx_lm_argument_names(loaded):
    model, tok = loaded
    greedy = mr.generate(model, tok, PROMPT, max_tokens=8, drafter=None)
    assert mr.generate(model, tok, PROMPT, max_tokens=8, temp=0.0, top_p=0.0, top_k=0, min_p=0.0) == greedy
    a = tokens(mr.stream_generate(model, tok, PROMPT, max_tokens=12, temp=0.8, top_p=0.9, top_k=20, seed=7))
    b = tokens(mr.stream_generate(model, tok, PROMPT, max_tokens=12,
                                  sampling=mr.SamplingConfig(temperature=0.8, top_p=0.9, top_k=20, seed=7)))
    assert a == b
    with pytest.raises(TypeError, match="temp="):
        mr.generate(model, tok, PROMPT, sampler=lambda x: x)
    with pytest.raises(TypeError, match="drafter="):
        mr.generate(model, tok, PROMPT, draft_model=model)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_token'"):
        mr.generate(model, tok, PROMPT, max_token=8)
    with pytest.raises(TypeError, match="not both"):
        mr.generate(model, tok, PROMPT, temp=0.5, sampling=mr.SamplingConfig())


def test_verbose_prints_mlx_lms_report(loaded, capsys):
    model, tok = loaded
    text = mr.generate(model, tok, PROMPT, max_tokens=N, verbose=True)
    out = capsys.readouterr().out
    assert out.startswith("=" * 10 + "\n") and text in out
    for line in ("Prompt: 4 tokens, ", f"Generation: {N} tokens, ", "tokens-per-sec", "Peak memory: ", "Speculative: "):
        assert line in out
    mr.generate(model, tok, PROMPT, max_tokens=4, verbose=True, speculative=False)
    assert "Plain decoding (no drafter)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["load", "generate", "stream_generate", "BeamShape", "default_shape",
                                  "SamplingConfig", "load_drafter", "find_drafter", "Drafter", "Decoder",
                                  "GenerationResponse", "train", "TrainConfig", "TrainResult", "eval_drafter",
                                  "EvalResult", "benchmark", "BenchmarkResult"])
def test_public_names_are_top_level_with_an_example(name):
    obj = getattr(mr, name)
    assert name in mr.__all__ and obj.__doc__ and ">>>" in obj.__doc__


def test_the_engine_runs_from_top_level_names(loaded):
    model, tok = loaded
    plain = tokens(mr.stream_generate(model, tok, PROMPT, max_tokens=8, drafter=None))
    decoder = mr.Decoder(model, model.drafter, mr.default_shape(), mr.SamplingConfig())
    got = []
    for step, _ in decoder.run([PROMPT]):
        got += list(step[0])
        if len(got) >= 8:
            break
    assert got[:8] == plain


# ---- the slow-BLAS notice: import order, in fresh processes ----

ORDER_CODE = """
import sys
{first}
import mlx_redrafter as mr
from mlx_redrafter import backend
model, tok = mr.load(sys.argv[1], dtype="float32")
print("notice:", backend.blas_notice())
mr.generate(model, tok, [3, 4, 5], max_tokens=4, verbose=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is Linux-only")
@pytest.mark.parametrize("first", ["import mlx.core", "import mlx_lm", "pass"])
def test_import_order_slow_blas_is_said_by_load_and_the_report(model_dir, first):
    from mlx_redrafter import backend

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLX_REDRAFTER_BLAS": "auto", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", ORDER_CODE.format(first=first), str(model_dir)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Generation: 4 tokens" in r.stdout
    late = first != "pass" and backend.find_blas() is not None
    said = "runs on MLX's slow reference BLAS"
    if late:  # by load() on stderr; by the report (and the print above) on stdout; with the fix
        assert r.stderr.count(said) == 1 and r.stdout.count(said) == 2, (r.stdout, r.stderr)
        assert "import mlx_redrafter first" in r.stdout and "restart the kernel" in r.stdout
    else:
        assert said not in r.stdout + r.stderr and "notice: None" in r.stdout
