"""The GGUF tokenizer against reference token ids (tests/fixtures/tokenizer_golden.json, written by
make_tokenizer_golden.py from `tokenizers` laid out as each model family's tokenizer.json, and llama.cpp)."""

import json
from pathlib import Path

import pytest

from mlx_redrafter.gguf_tokenizer import PRE_TOKENIZERS, build_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_golden.json").read_text(encoding="utf-8"))
CORPUS = GOLDEN["corpus"]
SMALL = GOLDEN["small_vocab"]


def small_meta(pre, **extra):
    tokens = SMALL["tokens"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": SMALL["merges"],
            "tokenizer.ggml.token_type": [3 if t in SMALL["special"] else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>")}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return {**meta, **extra}


@pytest.mark.parametrize("pre", sorted(GOLDEN["pre_tokenizers"]))
def test_pre_tokenizer_pieces_and_ids_equal_the_reference(pre):
    expected = GOLDEN["pre_tokenizers"][pre]
    tok = build_tokenizer(small_meta(pre))
    backend = tok.backend_tokenizer
    for text, pieces, ids in zip(CORPUS, expected["pieces"], expected["ids"]):
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        if "<|" not in text:  # special tokens are cut out before the pre-tokenizer runs
            assert [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)] == pieces, text
        assert tok.encode(text) == ids, text


@pytest.mark.parametrize("alias, name", [("gpt2", "gpt-2"), ("llama3", "llama-bpe"), ("llama-v3", "llama-bpe")])
def test_aliases_tokenize_as_their_type(alias, name):
    assert [build_tokenizer(small_meta(alias)).encode(t) for t in CORPUS] == GOLDEN["pre_tokenizers"][name]["ids"]


def test_every_supported_type_is_checked():
    assert set(PRE_TOKENIZERS) - {"gpt2", "llama3", "llama-v3"} == set(GOLDEN["pre_tokenizers"])


def test_the_default_model_tokenizes_as_smollm2(default_model):
    """The issue's case: a whitespace run before a digit is one piece after the digit split."""
    _, tok, _ = default_model
    assert [tok.encode(t) for t in CORPUS] == GOLDEN["default_model"]["ids"]
    assert tok.encode("Note: \n        1. Collatz")[2:4] == [216, 466]  # "Ġ", "ĊĠĠĠĠĠĠĠĠ", then "1"


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ValueError) as e:
        build_tokenizer(small_meta("tekken-2099"))
    message = str(e.value)
    assert "'tekken-2099'" in message and "not supported" in message and "smollm" in message and "\n" not in message


def test_missing_pre_tokenizer_uses_llama_cpps_default_with_a_note(capsys):
    tok = build_tokenizer(small_meta(None))
    assert "names no pre-tokenizer" in capsys.readouterr().err
    assert [tok.encode(t) for t in CORPUS] == GOLDEN["pre_tokenizers"]["default"]["ids"]


def test_bos_is_added_to_plain_text_only_when_the_file_asks():
    plain = build_tokenizer(small_meta("llama-bpe"))
    bos = build_tokenizer(small_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": True}))
    start = SMALL["tokens"].index("<|im_start|>")
    assert bos.encode("hello") == [start] + plain.encode("hello")
    assert bos.encode("hello", add_special_tokens=False) == plain.encode("hello")
