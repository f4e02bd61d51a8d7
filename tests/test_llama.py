"""Parity of the base model with mlx-lm's own models, for every supported family."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import FAMILIES, tiny_config, tiny_model
from mlx_lm.models.cache import make_prompt_cache
from mlx_redrafter.llama import ModelArgs
from mlx_redrafter.reference import to_mlx_lm

ATOL = 1e-4


@pytest.fixture(params=sorted(FAMILIES))
def pair(request):
    config = tiny_config(request.param)
    model = tiny_model(config)
    return model, to_mlx_lm(model, config)


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
