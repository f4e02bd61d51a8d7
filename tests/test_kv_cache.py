"""KVCache.keep_rows / SlotCache.keep_rows: dropping batch rows keeps the others' keys, values and counts."""
import mlx.core as mx
import numpy as np

from mlx_redrafter.kv_cache import KVCache, SlotCache


def filled(cache, B=3, length=8):
    keys = mx.array(np.arange(B * 2 * length * 4, dtype=np.float32).reshape(B, 2, length, 4))
    start = cache.allocate(length)
    for layer in cache.layers:
        layer.write(keys, -keys, start)
    return keys


def test_kept_rows_hold_their_own_keys_and_values():
    cache = KVCache(num_layers=2)
    keys = filled(cache)
    cache.keep_rows(mx.array([0, 2]))
    for layer in cache.layers:
        assert layer.keys.shape[0] == 2
        assert mx.array_equal(layer.keys[..., :8, :], keys[mx.array([0, 2])])
        assert mx.array_equal(layer.values[..., :8, :], -keys[mx.array([0, 2])])
    assert cache.length == 8


def test_a_slot_cache_keeps_the_rows_committed_counts_and_valid_slots():
    cache = SlotCache(num_layers=1)
    filled(cache)
    cache.start([3, 8, 5])
    cache.keep_rows(mx.array([1, 2]))
    assert cache.lengths.tolist() == [8, 5]
    assert cache.valid[:, :8].tolist() == [[True] * 8, [True] * 5 + [False] * 3]
    assert cache.layers[0].keys.shape[0] == 2
