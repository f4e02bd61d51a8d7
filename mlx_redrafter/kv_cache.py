"""KV cache written by position (gpt-fast style), with path commit for tree verification.

Each layer keeps one growing buffer of shape (B, kv_heads, capacity, head_dim),
capacity a multiple of 256. `length` counts committed tokens; a forward pass
writes its n new keys at [length, length + n), attends over [0, length + n)
(or over a fixed `span` of slots, masked, see `span_for`) and advances
`length` by n.
Tree verification writes the packed tree after the committed prefix, then
`copy_path` gathers the accepted nodes' K/V into place and `truncate` drops
the rest:

    committed: [t0 t1 t2]  tree written at 3..8: [g0 a b c d e]
    accepted path = nodes (0, 2, 4) -> keys of g0, b, d copied to slots 3, 4, 5
    length becomes 3 + accepted count; the stale slots are overwritten later.
"""

from typing import List, Optional

import mlx.core as mx


class LayerKV:
    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def write(self, keys: mx.array, values: mx.array, start: int, span: Optional[int] = None):
        """Store (B, kv_heads, n, D) keys/values at [start, start+n); return slots [0, span or start+n)."""
        end = start + keys.shape[2]
        span = span or end
        if self.keys is None or max(end, span) > self.keys.shape[2]:
            self._grow(keys, max(end, span))
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        return self.keys[..., :span, :], self.values[..., :span, :]

    def _grow(self, like: mx.array, needed: int):
        B, H, _, D = like.shape
        capacity = KVCache.span_for(needed)  # so a span never changes without the buffer growing
        new_k = mx.zeros((B, H, capacity, D), like.dtype)
        new_v = mx.zeros((B, H, capacity, D), like.dtype)
        if self.keys is not None:
            old = self.keys.shape[2]
            new_k[..., :old, :] = self.keys
            new_v[..., :old, :] = self.values
        self.keys, self.values = new_k, new_v

    def gather(self, src: mx.array, dst: int):
        """Copy slots `src` (int array, shape (m,)) to [dst, dst+m)."""
        m = src.shape[0]
        self.keys[..., dst : dst + m, :] = self.keys[..., src, :]
        self.values[..., dst : dst + m, :] = self.values[..., src, :]

    def state(self) -> List[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class KVCache:
    """Per-layer K/V buffers plus the committed length shared by all layers."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.length = 0

    @staticmethod
    def span_for(end: int) -> int:
        """A key span covering slots [0, end) that changes only every `LayerKV.step` tokens.

        Attending over the whole span (with the slots past `end` masked out)
        keeps attention shapes fixed between steps; on a GPU every new shape
        costs a kernel or cuDNN graph build, ~25 ms on MLX CUDA.
        """
        return -(-end // LayerKV.step) * LayerKV.step

    def truncate(self, length: int):
        self.length = length

    def copy_path(self, start: int, path: mx.array):
        """Move tree nodes `path` (indices into the tree written at `start`) to `start`.

        path: (Lb,) node indices of the chosen beam, root first, in packed order.
        The gather has the fixed shape (Lb,) so it stays on the device; once the
        host knows how many nodes were accepted it calls `truncate(start + accepted)`.
        """
        src = path.astype(mx.int32) + start
        for layer in self.layers:
            layer.gather(src, start)

    def state(self) -> List[mx.array]:
        return [a for layer in self.layers for a in layer.state()]
