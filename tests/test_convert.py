"""`convert`: PyTorch / safetensors Hugging Face models and ReDrafter drafters to MLX, safely."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import word_tokenizer  # noqa: E402
from mlx_redrafter.convert import convert_base, convert_drafter  # noqa: E402
from mlx_redrafter.drafter import load_drafter  # noqa: E402
from mlx_redrafter.loading import load  # noqa: E402
from mlx_redrafter.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, tie_word_embeddings=False)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)),
}
TOKENS = [[3, 17, 42, 5, 88, 9, 1]]


def save_torch_bin(model, path, shards=1):
    """Old-style pytorch_model*.bin (transformers 5 writes only safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(keys, shards)):
            part = [str(k) for k in part]  # numpy strings would pickle as numpy objects
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in part}, path / name)
            weight_map.update({k: name for k in part})
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    word_tokenizer(96)._tokenizer.save_pretrained(str(path))
    return path


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.fixture(params=sorted(FAMILIES))
def hf_model(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "safetensors-sharded"])
def test_converted_logits_equal_transformers(tmp_path, hf_model, layout):
    src = tmp_path / "src"
    if layout == "safetensors-sharded":
        hf_model.save_pretrained(src, max_shard_size="100KB")
        word_tokenizer(96)._tokenizer.save_pretrained(str(src))
        assert len(list(src.glob("*.safetensors"))) > 1
    else:
        save_torch_bin(hf_model, src, shards=3 if layout == "bin-sharded" else 1)
    out = convert_base(src, tmp_path / "mlx", dtype="float32", progress=False)
    model, tok = load(out, dtype="float32")
    ours = np.array(model.logits(model(mx.array(TOKENS))))
    np.testing.assert_allclose(ours, torch_logits(hf_model), atol=1e-4)
    from mlx_lm import load as mlx_lm_load

    ref, _ = mlx_lm_load(str(out))
    np.testing.assert_allclose(np.array(ref(mx.array(TOKENS))), ours, atol=1e-4)
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".mlx.partial*"))


def test_quantized_conversion(tmp_path):
    torch.manual_seed(1)
    hf = FAMILIES["llama"]().eval()
    src = save_torch_bin(hf, tmp_path / "src")
    out = convert_base(src, tmp_path / "q", dtype="float32", quantize=True, q_bits=8, q_group_size=32, progress=False)
    model, _, config = load(out, dtype="float32", dequantize=False, return_config=True)
    assert config["quantization"]["bits"] == 8
    np.testing.assert_allclose(np.array(model.logits(model(mx.array(TOKENS)))), torch_logits(hf), atol=0.05)


def test_bfloat16_shared_and_strided_tensors(tmp_path):
    w = torch.randn(6, 4)
    state = {"w": w, "tied": w, "t": w.t(), "slice": w[2:5, 1:3], "bf16": torch.randn(3, 5).to(torch.bfloat16)}
    torch.save(state, tmp_path / "x.bin")
    got = load_torch_checkpoint(tmp_path / "x.bin")
    from mlx_redrafter.torch_pickle import to_mlx

    for k, v in state.items():
        np.testing.assert_array_equal(np.array(to_mlx(got[k]).astype(mx.float32)), v.float().numpy())
    assert to_mlx(got["bf16"]).dtype == mx.bfloat16


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "x": RunsCode(marker)}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*system"):
        load_torch_checkpoint(tmp_path / "evil.bin")
    assert not marker.exists()
    (tmp_path / "src").mkdir()
    (tmp_path / "evil.bin").rename(tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL}))
    with pytest.raises(UnsafeCheckpointError):
        convert_base(tmp_path / "src", tmp_path / "out", progress=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bad_inputs_leave_no_output(tmp_path):
    torch.manual_seed(2)
    src = save_torch_bin(FAMILIES["llama"]().eval(), tmp_path / "src")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        convert_base(src, tmp_path / "o1", progress=False)
    src = save_torch_bin(FAMILIES["llama"]().eval(), tmp_path / "src2")
    state = torch.load(src / "pytorch_model.bin")
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not fit a llama model.*up_proj") as e:
        convert_base(src, tmp_path / "o2", progress=False)
    assert "\n" not in str(e.value)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 7)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not fit a llama model"):
        convert_base(src, tmp_path / "o3", progress=False)
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        convert_base(src, tmp_path / "o4", progress=False)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_existing_output_needs_force(tmp_path):
    torch.manual_seed(3)
    src = save_torch_bin(FAMILIES["qwen2"]().eval(), tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        convert_base(src, tmp_path / "out", progress=False)
    convert_base(src, tmp_path / "out", force=True, progress=False)
    assert (tmp_path / "out" / "config.json").exists()


# ---- drafters written in PyTorch from the equations ----

class TorchDrafter(torch.nn.Module):
    """Apple's ReDrafter head, written from the equations in REDRAFTER.md."""

    def __init__(self, H, E, V, L):
        super().__init__()
        if 2 * H != E:
            self.input_proj = torch.nn.Linear(2 * H, E)
        blocks = [torch.nn.Module() for _ in range(L)]
        for b in blocks:
            b.linear = torch.nn.Linear(E, E)
        self.lm_head = torch.nn.ModuleList(blocks + [torch.nn.Linear(E, V, bias=False)])
        self.rnn_u = torch.nn.Linear(H, H)
        self.rnn_w = torch.nn.Linear(H, H, bias=False)

    def forward(self, h, embeddings):
        s = torch.zeros_like(h)
        for e in embeddings:
            s = torch.nn.functional.silu(self.rnn_w(e) + self.rnn_u(s))
        x = torch.cat([h, s], dim=-1)
        if hasattr(self, "input_proj"):
            x = self.input_proj(x)
        for block in self.lm_head[:-1]:
            x = x + torch.nn.functional.silu(block.linear(x))
        return self.lm_head[-1](x)


@pytest.mark.parametrize("form", ["apple-dir", "raw-pt-trtllm", "safetensors-no-config"])
def test_drafter_conversion(tmp_path, form):
    torch.manual_seed(4)
    H, E, V, L = 16, 48, 96, 2
    ref = TorchDrafter(H, E, V, L).eval()
    state = ref.state_dict()
    src = tmp_path / "src"
    src.mkdir()
    if form == "apple-dir":
        torch.save(state, src / "pytorch_model.bin")
        (src / "config.json").write_text(json.dumps({"vocab_size": V, "hidden_size": H, "exit_dim": E,
                                                     "num_draft_layers": L, "rnn": True}))
        path = src
    elif form == "raw-pt-trtllm":
        renamed = {k.replace("input_proj.", "input_projs.0.").replace("lm_head.", "lm_heads."): v for k, v in state.items()}
        torch.save({"state_dict": renamed}, src / "drafter.pt")
        path = src / "drafter.pt"
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors")
        path = src
    out = convert_drafter(path, tmp_path / "d", dtype="float32")
    drafter = load_drafter(out)
    assert (drafter.config.hidden_size, drafter.config.exit_dim, drafter.config.num_draft_layers) == (H, E, L)
    h, e1, e2 = torch.randn(H), torch.randn(H), torch.randn(H)
    with torch.no_grad():
        want = ref(h, [e1, e2]).numpy()
    state_mx = drafter.next_state(drafter.next_state(mx.zeros((H,)), mx.array(e1.numpy())), mx.array(e2.numpy()))
    np.testing.assert_allclose(np.array(drafter(mx.array(h.numpy()), state_mx)), want, atol=1e-4)


def test_drafter_checked_against_base(tmp_path):
    from conftest import tiny_config, tiny_model

    torch.manual_seed(5)
    torch.save(TorchDrafter(16, 32, 96, 1).state_dict(), tmp_path / "d.pt")
    base = tiny_model(tiny_config(vocab_size=64))
    with pytest.raises(ValueError, match="drafter does not match the base model"):
        convert_drafter(tmp_path / "d.pt", tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()


def test_convert_command_line(tmp_path):
    from typer.testing import CliRunner

    from mlx_redrafter.cli import app

    torch.manual_seed(6)
    src = save_torch_bin(FAMILIES["llama"]().eval(), tmp_path / "src")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "base", str(src), str(tmp_path / "out"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    again = runner.invoke(app, ["convert", "base", str(src), str(tmp_path / "out")])
    assert again.exit_code == 2 and again.output.strip().endswith("already exists: pass --force to replace it")
    bad = runner.invoke(app, ["convert", "base", str(src), str(tmp_path / "q"), "--quantize", "--q-bits", "7"])
    assert bad.exit_code == 2 and "--q-bits" in bad.output and not (tmp_path / "q").exists()
    torch.save(TorchDrafter(64, 128, 96, 1).state_dict(), tmp_path / "d.pt")
    r = runner.invoke(app, ["convert", "drafter", str(tmp_path / "d.pt"), str(tmp_path / "d"), "--base", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert load_drafter(tmp_path / "d").config.exit_dim == 128
