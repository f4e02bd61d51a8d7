import mlx_redrafter  # noqa: F401  (before mlx: preloads the fast BLAS)
import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_redrafter.llama import Model, ModelArgs

FAMILIES = {
    "llama3": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=256,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama2": dict(model_type="llama", tie_word_embeddings=False, num_key_value_heads=4),
    "vicuna-linear-rope": dict(model_type="llama", tie_word_embeddings=False, rope_scaling={"type": "linear", "factor": 2.0}),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=1e6, sliding_window=4096),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=24, rope_theta=1e6, max_position_embeddings=256),
    "smollm": dict(model_type="llama", tie_word_embeddings=True, rope_theta=100000.0),
}


def tiny_config(family="smollm", vocab_size=64, hidden_size=48, layers=2, **overrides):
    config = dict(hidden_size=hidden_size, num_hidden_layers=layers, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, rms_norm_eps=1e-5, max_position_embeddings=512)
    config.update(FAMILIES[family])
    config.update(overrides)
    return config


def tiny_model(config, seed=0, scale=1.0):
    """A random model; `scale` sharpens its output distribution."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    if scale != 1.0:
        model.model.norm.weight = model.model.norm.weight * scale
    mx.eval(model.parameters())
    return model


def word_tokenizer(vocab_size, eos=1, extra_words=(), chat_template=None):
    """A whitespace tokenizer over words t0..t{V-1} (then `extra_words`), wrapped as mlx-lm does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([f"t{i}" for i in range(vocab_size)] + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", unk_token="t0")
    hf.chat_template = chat_template
    return TokenizerWrapper(hf)


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (fetched into the user cache once): (model, tokenizer, config);
    model.drafter is the packaged drafter."""
    from mlx_redrafter import load

    return load(return_config=True)


DRAFTER_VARIANTS = {
    "apple": dict(exit_dim=96, num_draft_layers=2),  # E = 2H: no input_proj, own V x E head
    "proj": dict(exit_dim=64, num_draft_layers=1),  # E != 2H: input_proj
    "shared-head": dict(exit_dim=48, num_draft_layers=1, shared_lm_head=True),
    "reduced-vocab": dict(exit_dim=96, num_draft_layers=1, draft_vocab_size=12),
    "no-rnn": dict(exit_dim=96, num_draft_layers=1, rnn=False),
    "features": dict(exit_dim=64, num_draft_layers=1, feature_layers=[0]),  # reads a base layer's output too
}


def tiny_drafter(base, variant="apple", seed=1, scale=1.0):
    from mlx_redrafter.drafter import DrafterConfig, init_drafter

    mx.random.seed(seed)
    args = base.args
    config = DrafterConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, **DRAFTER_VARIANTS[variant])
    draft_to_token = None
    if config.draft_vocab_size:
        draft_to_token = mx.random.permutation(args.vocab_size)[: config.draft_vocab_size]
    drafter = init_drafter(config, base, draft_to_token)
    if config.feature_layers:  # not the pass-through init: the captured layers must matter
        drafter.feature_proj.weight = mx.random.normal(drafter.feature_proj.weight.shape) * 0.2
    if scale != 1.0 and not config.shared_lm_head:
        drafter.lm_head[-1].weight = drafter.lm_head[-1].weight * scale
    mx.eval(drafter.parameters())
    return drafter


def one_line(excinfo, *needles):
    """The error's message: one line, holding every needle."""
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert needle in message, message
    return message


def stand_in_kernel(monkeypatch, gradient: bool = True) -> list:
    """Make `cuda_matmul` launch as on a CUDA GPU (2-64 rows), through a stand-in that computes
    `cuda_matmul.reference` (and fails when differentiated unless `gradient`). Returns the list each
    launch appends (rows, its `Fused` flags) to."""
    from mlx_redrafter import cuda_matmul

    calls = []

    def kernel(fused, inputs, output_shapes, output_dtypes, **_):
        calls.append((inputs[0].shape[0], fused))

        @mx.custom_function
        def launch(*arrays):
            a = dict(zip(fused.input_names(), arrays))
            if fused.rope:
                (B, heads, n, _), (_, kv_heads, _, _) = output_shapes[:2]
                return cuda_matmul.reference_qkv_rope(a["x"].reshape(B, n, -1), a["w"], a.get("gamma"), fused.eps,
                                                      a.get("bias"), a["positions"], a["inv_freq"], heads, kv_heads)
            return cuda_matmul.reference(a["x"], a["w"], a.get("gamma"), fused.eps, a.get("bias"), a.get("res"),
                                         fused.glu, fused.silu)

        if not gradient:
            @launch.vjp
            def no_gradient(primals, cotangent, output):
                raise RuntimeError("the CUDA kernel was differentiated")

        outs = launch(*inputs)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        assert [o.shape for o in outs] == [tuple(s) for s in output_shapes]  # what _launch asks MLX for
        assert [o.dtype for o in outs] == list(output_dtypes)
        return outs

    monkeypatch.setattr(cuda_matmul, "available", lambda rows, w: 2 <= rows <= cuda_matmul.MAX_ROWS)
    monkeypatch.setattr(cuda_matmul, "_get_kernel", lambda fused: lambda **kw: kernel(fused, **kw))
    return calls
