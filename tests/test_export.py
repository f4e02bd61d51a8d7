"""`mlx-redrafter export --format trtllm`: what TensorRT-LLM's ReDrafter converter reads, and the round trip back.

`trtllm_reads` repeats, with the same libraries (safetensors' torch reader, torch casts),
what NVIDIA/TensorRT-LLM's examples/redrafter/convert_checkpoint.py (commit 0e8b9484)
does with --drafter_model_dir; `trtllm_shapes` gives the parameter shapes of
tensorrt_llm/models/redrafter/drafter.py's Drafter (commit 8fcf9fc2) that those
tensors are loaded into. Sources read for this test:

- convert_checkpoint.py `main()`: `Path(drafter_model_dir, "model.safetensors")` read with
  `safetensors.safe_open(ckpt_file, framework="pt", device="cpu")`, every `f.get_tensor(key)`;
  `create_and_save_config()`: `Namespace(**json.load(fp))` of `config.json`.
- `hf_drafter()`: `if config.hidden_size * 2 != config.exit_dim:` read `input_proj` weight and bias;
  `for layer_idx in range(config.num_draft_layers)`: `lm_head.{i}.linear` weight and bias;
  `lm_head.{num_draft_layers}` weight only; `if config.rnn:` `rnn_u` weight and bias, `rnn_w` weight.
  Each through llama/convert.py's `get_weight(params, prefix, dtype)`:
  `params[prefix + ".weight"]`, cast `.to(dtype)` (`--dtype`, default float16); then `split(..., tp_size, rank)`
  (the tensor itself at tp_size 1), stored as `drafter.input_proj.*`, `drafter.layers.{i}.linear.*`,
  `drafter.lm_head.weight`, `drafter.rnn_u.*`, `drafter.rnn_w.weight`.
- `hf_redrafter_config()`: `redrafter_num_layers = num_draft_layers`, `redrafter_hidden_size = hidden_size`,
  `redrafter_exit_dim = exit_dim`, `redrafter_is_rnn = rnn`.
- drafter.py `Drafter.__init__` / `from_config`: ColumnLinear (weight (out, in)) `input_proj` (2H -> E, bias)
  only when 2H != E; `layers[i].linear` (E -> E, bias); `lm_head` (E -> vocab_size_padded, no bias), the
  padded vocabulary being the *base model's* `vocab_size`; `rnn_u` (H -> H, bias) and `rnn_w` (H -> H, no bias)
  when `is_rnn`.
"""

import json
from argparse import Namespace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import one_line, tiny_config, tiny_drafter, tiny_model
from mlx_redrafter.beam_search import BeamShape, draft_levels
from mlx_redrafter.convert import convert_drafter
from mlx_redrafter.drafter import DrafterConfig, init_drafter, load_drafter, save_drafter
from mlx_redrafter.export import export_drafter, widened_exit_dim

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

VOCAB, HIDDEN = 64, 48


def trtllm_reads(drafter_dir, dtype=None):
    """(redrafter config fields, weights) as convert_checkpoint.py gets them (module docstring)."""
    dtype = dtype or torch.float16
    with open(Path(drafter_dir, "config.json")) as fp:
        config = Namespace(**json.load(fp))
    ckpt = {}
    with safetensors.safe_open(Path(drafter_dir, "model.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():
            ckpt[key] = f.get_tensor(key)

    def get(prefix, bias=True):
        weight = ckpt[prefix + ".weight"].to(dtype)
        return (weight, ckpt[prefix + ".bias"].to(dtype)) if bias else weight

    weights = {}
    if config.hidden_size * 2 != config.exit_dim:
        weights["drafter.input_proj.weight"], weights["drafter.input_proj.bias"] = get("input_proj")
    for i in range(config.num_draft_layers):
        weights[f"drafter.layers.{i}.linear.weight"], weights[f"drafter.layers.{i}.linear.bias"] = get(f"lm_head.{i}.linear")
    weights["drafter.lm_head.weight"] = get(f"lm_head.{config.num_draft_layers}", bias=False)
    if config.rnn:
        weights["drafter.rnn_u.weight"], weights["drafter.rnn_u.bias"] = get("rnn_u")
        weights["drafter.rnn_w.weight"] = get("rnn_w", bias=False)
    fields = {"redrafter_num_layers": config.num_draft_layers, "redrafter_hidden_size": config.hidden_size,
              "redrafter_exit_dim": config.exit_dim, "redrafter_is_rnn": config.rnn}
    return fields, weights, set(ckpt)


def trtllm_shapes(fields, vocab_size):
    """Parameter shapes of TensorRT-LLM's redrafter Drafter built from those fields (tp_size 1)."""
    H, E, L = fields["redrafter_hidden_size"], fields["redrafter_exit_dim"], fields["redrafter_num_layers"]
    shapes = {}
    if 2 * H != E:
        shapes |= {"drafter.input_proj.weight": (E, 2 * H), "drafter.input_proj.bias": (E,)}
    for i in range(L):
        shapes |= {f"drafter.layers.{i}.linear.weight": (E, E), f"drafter.layers.{i}.linear.bias": (E,)}
    shapes["drafter.lm_head.weight"] = (vocab_size, E)
    if fields["redrafter_is_rnn"]:
        shapes |= {"drafter.rnn_u.weight": (H, H), "drafter.rnn_u.bias": (H,), "drafter.rnn_w.weight": (H, H)}
    return shapes


@pytest.fixture(scope="module")
def base():
    return tiny_model(tiny_config(vocab_size=VOCAB, hidden_size=HIDDEN), seed=5)


def saved(drafter, path):
    return save_drafter(drafter, path, dtype=mx.float32)


VARIANTS = ["apple", "proj", "no-rnn", "shared-head", "reduced-vocab", "reduced-proj"]


def make_drafter(base, variant):
    if variant != "reduced-proj":
        return tiny_drafter(base, variant, scale=3.0)
    mx.random.seed(2)  # a reduced head behind an input_proj (E != 2H)
    config = DrafterConfig(vocab_size=VOCAB, hidden_size=HIDDEN, exit_dim=40, num_draft_layers=2, draft_vocab_size=10)
    drafter = init_drafter(config, base, mx.random.permutation(VOCAB)[:10])
    drafter.lm_head[-1].weight = drafter.lm_head[-1].weight * 3.0
    return drafter


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_is_what_the_converter_reads(base, tmp_path, variant):
    drafter = make_drafter(base, variant)
    out = export_drafter(saved(drafter, tmp_path / "d"), tmp_path / "trt", base=base)
    fields, weights, stored = trtllm_reads(out)
    expected = trtllm_shapes(fields, VOCAB)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert len(stored) == len(expected)  # nothing written that the converter does not read
    with safetensors.safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # the converter's default --dtype
    config = drafter.config
    E = widened_exit_dim(config) if config.draft_vocab_size else config.exit_dim
    assert fields == {"redrafter_num_layers": config.num_draft_layers, "redrafter_hidden_size": HIDDEN,
                      "redrafter_exit_dim": E, "redrafter_is_rnn": config.rnn}
    raw = json.loads((out / "config.json").read_text())
    assert raw["vocab_size"] == VOCAB and raw["model_type"] == "recurrent_drafting_drafter"


def drafter_logits(drafter, base, seed=0):
    mx.random.seed(seed)
    hidden = mx.random.normal((6, HIDDEN))
    state = drafter.next_state(mx.zeros((6, HIDDEN)), base.embed(mx.arange(6) + 2))
    return drafter(hidden, state, base), hidden


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_convert_drafter(base, tmp_path, variant):
    """export (float32) -> `convert drafter` -> the same logits; a widened head drafts the same tokens."""
    drafter = make_drafter(base, variant)
    out = export_drafter(saved(drafter, tmp_path / "d"), tmp_path / "trt", base=base, dtype="float32")
    back = load_drafter(convert_drafter(out, tmp_path / "back", base, dtype="float32"), base)
    before, hidden = drafter_logits(drafter, base)
    after, _ = drafter_logits(back, base)
    config = drafter.config
    if config.draft_vocab_size:
        table = drafter.draft_to_token
        assert np.allclose(np.array(after[:, table]), np.array(before), atol=1e-5)
        outside = np.setdiff1d(np.arange(VOCAB), np.array(table))
        assert (np.array(after)[:, outside] == -1e4).all()
    else:
        assert mx.array_equal(after, before)  # same numbers: the same weights under the same names
    g0 = mx.arange(6) + 3
    for shape in (BeamShape(4, 5), BeamShape(8, 3)):
        a, b = draft_levels(drafter, base, hidden, g0, shape), draft_levels(back, base, hidden, g0, shape)
        assert mx.array_equal(a.tokens, b.tokens) and mx.array_equal(a.parents, b.parents)
        assert np.allclose(np.array(a.scores), np.array(b.scores), atol=1e-4)


def test_shared_head_needs_the_base_model(base, tmp_path):
    src = saved(make_drafter(base, "shared-head"), tmp_path / "d")
    with pytest.raises(ValueError) as e:
        export_drafter(src, tmp_path / "trt")
    one_line(e, "--base")
    assert not (tmp_path / "trt").exists()
    other = tiny_model(tiny_config(vocab_size=VOCAB + 8, hidden_size=HIDDEN))
    with pytest.raises(ValueError) as e:
        export_drafter(src, tmp_path / "trt", base=other)
    one_line(e, "another model")


def test_export_command_line(base, tmp_path):
    from typer.testing import CliRunner

    from mlx_redrafter.cli import app

    src = saved(make_drafter(base, "apple"), tmp_path / "d")
    run = CliRunner().invoke
    result = run(app, ["export", str(src), str(tmp_path / "trt")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "trt").iterdir()} >= {"config.json", "model.safetensors"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for args, needle in [(["--format", "onnx"], "--format"), (["--dtype", "int8"], "dtype")]:
        result = run(app, ["export", str(src), str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and needle in result.output and not (tmp_path / "x").exists()
    result = run(app, ["export", str(src), str(tmp_path / "trt")])
    assert result.exit_code == 2 and "--force" in result.output
    result = run(app, ["export", str(src), str(tmp_path / "mine"), "--force"])
    assert result.exit_code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert run(app, ["export", str(src), str(tmp_path / "trt"), "--force"]).exit_code == 0


def test_a_multi_layer_drafter_is_refused(base, tmp_path):
    src = saved(tiny_drafter(base, "features"), tmp_path / "d")
    with pytest.raises(ValueError) as e:
        export_drafter(src, tmp_path / "trt", base=base)
    one_line(e, "feature_layers", "without --feature-layers")
    assert not (tmp_path / "trt").exists()
