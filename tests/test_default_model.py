"""The embedded default model, SmolLM2-135M-Instruct, against mlx-lm on the same weights."""

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

from mlx_redrafter import generate, stream_generate
from mlx_redrafter.generate import encode_prompt
from mlx_redrafter.reference import to_mlx_lm

PROMPT = "Give three reasons to learn to cook."


def test_greedy_chat_output_equals_mlx_lm(default_model):
    model, tok, config = default_model
    ids = encode_prompt(tok, PROMPT)
    ours = [r.token for r in stream_generate(model, tok, ids, max_tokens=48, drafter=None)]
    ref = to_mlx_lm(model, config)
    theirs = [r.token for r in mlx_lm_stream_generate(ref, tok, mx.array(ids), max_tokens=48)]
    assert len(ours) >= 8
    assert ours == theirs[: len(ours)]


def test_chat_template_and_special_tokens(default_model):
    _, tok, _ = default_model
    ids = encode_prompt(tok, "hi")
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # system and user turns
    assert tok.eos_token == "<|im_end|>"
    assert encode_prompt(tok, "hi", chat_template=False) == tok.encode("hi")


def test_answers_a_simple_question(default_model):
    model, tok, _ = default_model
    assert "Paris" in generate(model, tok, "What is the capital of France?", max_tokens=24)


def test_a_copy_of_the_default_model_gets_the_packaged_drafter(default_model, tmp_path):
    from mlx_redrafter import find_drafter
    from mlx_redrafter.defaults import default_drafter_path
    from mlx_redrafter.loading import DEFAULT_MODEL, default_model_path

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / DEFAULT_MODEL.filename).symlink_to(default_model_path())
    assert find_drafter(str(tmp_path / "a" / DEFAULT_MODEL.filename), None) == default_drafter_path()
    (tmp_path / DEFAULT_MODEL.filename).write_bytes(b"GGUF not really")  # same name, other bytes
    assert find_drafter(str(tmp_path / DEFAULT_MODEL.filename), None) is None
