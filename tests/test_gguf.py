"""GGUF: names, config, llama.cpp's q/k permutation and the tokenizer, from a file written here."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tokenizers.pre_tokenizers import ByteLevel

from conftest import tiny_config, tiny_model
from mlx_redrafter.loading import load

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w, heads):
    """llama.cpp's convert script: Hugging Face q/k rows -> GGUF order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name):
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{i}.{NAMES[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_gguf(path, config, model):
    byte_tokens = sorted(ByteLevel.alphabet())
    tokens = SPECIALS + byte_tokens + ["Ġt", "he"]
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if "q_proj" in name:
            w = permute(w, config["num_attention_heads"])
        elif "k_proj" in name:
            w = permute(w, config["num_key_value_heads"])
        weights[gguf_name(name)] = w
    u32 = lambda v: mx.array(v, dtype=mx.uint32)
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(512),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.token_type": mx.array([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }
    mx.save_gguf(str(path), weights, meta)
    return tokens


@pytest.fixture
def gguf_file(tmp_path):
    config = tiny_config("smollm", vocab_size=261, hidden_size=64, num_key_value_heads=2)
    model = tiny_model(config)
    tokens = write_gguf(tmp_path / "tiny.gguf", config, model)
    return tmp_path / "tiny.gguf", model, tokens


def test_gguf_weights_match_after_unpermuting(gguf_file):
    path, model, _ = gguf_file
    loaded, _, config = load(path, dtype="float32", return_config=True)
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    x = mx.array([[5, 9, 100, 7]])
    assert mx.allclose(loaded.logits(loaded(x)), model.logits(model(x)), atol=1e-4)


def test_gguf_tokenizer_special_tokens_and_template(gguf_file):
    path, _, tokens = gguf_file
    _, tok = load(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "the 42"}], add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 1  # <|im_start|> / <|im_end|> are single tokens
    assert tok.decode(ids) == "<|im_start|>user\nthe 42<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("42") == [tokens.index("4"), tokens.index("2")]  # digits split one by one
    assert tokens[tok.encode(" t")[0]] == "Ġt"  # merges apply
    assert tok.eos_token_ids == {2}


def test_truncated_gguf(tmp_path, gguf_file):
    path, _, _ = gguf_file
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not read GGUF file"):
        load(bad)
