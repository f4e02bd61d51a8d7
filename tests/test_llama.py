"""Parity of the base model with mlx-lm's own models, for every supported family."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import FAMILIES, tiny_config, tiny_model
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_flatten
from mlx_redrafter.llama import ModelArgs, fuse_projections, mlx_lm_weights
from mlx_redrafter.reference import to_mlx_lm

ATOL = 1e-4


@pytest.fixture(params=[(family, fused) for family in sorted(FAMILIES) for fused in (False, True)],
                ids=lambda p: f"{p[0]}-{'fused' if p[1] else 'mlx-lm-layout'}")
def pair(request):
    family, fused = request.param
    config = tiny_config(family)
    model = tiny_model(config)
    if fused:  # as load() builds it: q/k/v and gate/up as one matmul each
        fuse_projections(model)
        assert "qkv_proj" in model.layers[0].self_attn and "gate_up_proj" in model.layers[0].mlp
    return model, to_mlx_lm(model, config)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_fused_projections_equal_the_separate_ones(bits):
    model = tiny_model(tiny_config("qwen2", hidden_size=64))  # q/k/v biases too
    if bits:
        nn.quantize(model, 32, bits)
    before = dict(tree_flatten(model.parameters()))
    tokens = mx.random.randint(0, 64, (2, 7))
    separate = model.logits(model(tokens))
    fuse_projections(model)
    assert mx.allclose(model.logits(model(tokens)), separate, atol=ATOL)  # wider BLAS calls round differently
    after = mlx_lm_weights(model)
    assert sorted(after) == sorted(before) and all(mx.array_equal(after[k], v) for k, v in before.items())


def test_projections_stored_differently_stay_apart():
    model = tiny_model(tiny_config("llama3", hidden_size=64))
    nn.quantize(model, 32, 4, class_predicate=lambda path, m: path.endswith("q_proj") or path.endswith("gate_proj"))
    tokens = mx.random.randint(0, 64, (1, 5))
    separate = model.logits(model(tokens))
    fuse_projections(model)
    assert "q_proj" in model.layers[0].self_attn and "gate_proj" in model.layers[0].mlp
    assert mx.allclose(model.logits(model(tokens)), separate, atol=ATOL)


def test_full_sequence_matches_mlx_lm(pair):
    model, ref = pair
    tokens = mx.random.randint(0, 64, (2, 13))
    assert mx.allclose(model.logits(model(tokens)), ref(tokens), atol=ATOL)


def test_cached_decoding_matches_mlx_lm(pair):
    model, ref = pair
    tokens = mx.random.randint(0, 64, (1, 20))
    cache, ref_cache = model.make_cache(), make_prompt_cache(ref)
    for chunk in (tokens[:, :9], tokens[:, 9:10], tokens[:, 10:16], tokens[:, 16:17]):
        ours = model.logits(model(chunk, cache))
        assert mx.allclose(ours, ref(chunk, cache=ref_cache), atol=ATOL)
    assert cache.length == 17


def test_explicit_positions_and_mask(pair):
    model, ref = pair
    tokens = mx.random.randint(0, 64, (1, 10))
    n = tokens.shape[1]
    causal_bool = mx.tril(mx.ones((n, n), dtype=mx.bool_))
    additive = mx.where(causal_bool, 0.0, -mx.inf)
    for mask in (causal_bool, additive):
        got = model.logits(model(tokens, positions=mx.arange(n)[None], mask=mask))
        assert mx.allclose(got, ref(tokens), atol=ATOL)


@pytest.mark.parametrize("span", [0, 256, 512])
def test_tree_mask_equals_separate_branches(span):
    """Two branches packed with an ancestor mask give each branch's own logits,
    also when attention covers a fixed span of cache slots holding stale keys."""
    model = tiny_model(tiny_config("llama3"))
    prefix, a, b = [5, 6, 7], [8, 9], [10, 11]
    cache = model.make_cache()
    model(mx.array([prefix + [1, 2, 3, 4, 5, 6]]), cache)  # stale slots past the prefix
    cache.truncate(len(prefix))
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)
    mask = np.zeros((4, max(span, 7)), dtype=bool)
    mask[:, :3], mask[:, 3:7] = True, tree
    positions = mx.array([[3, 4, 3, 4]])
    got = model.logits(model(mx.array([a + b]), cache, positions, mx.array(mask)))
    for branch, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
        want = model.logits(model(mx.array([prefix + branch])))[:, 3:]
        assert mx.allclose(got[:, rows], want, atol=ATOL)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt_neox'"):
        ModelArgs.from_dict({**tiny_config(), "model_type": "gpt_neox"})


def test_transformers5_nested_rope_parameters():
    config = tiny_config("qwen3")
    theta = config.pop("rope_theta")
    args = ModelArgs.from_dict({**config, "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    assert args.rope_theta == theta and args.rope_scaling is None


def test_captured_layers_match_mlx_lm(pair):
    """capture=: each captured layer's output (RMS-normalized, no weight) as mlx-lm's layers give it, then
    the final hidden state; what a multi-layer drafter reads."""
    model, ref = pair
    tokens = mx.random.randint(0, 64, (2, 9))
    hidden, features = model(tokens, capture=(0,))
    assert mx.array_equal(hidden, model(tokens)) and features.shape == (2, 9, 2 * hidden.shape[-1])
    h = ref.model.embed_tokens(tokens)
    h = ref.model.layers[0](h, mask="causal", cache=None)
    want = mx.fast.rms_norm(h, None, model.args.rms_norm_eps)
    assert mx.allclose(features[..., : hidden.shape[-1]], want, atol=ATOL)
    assert mx.array_equal(features[..., hidden.shape[-1]:], hidden)
