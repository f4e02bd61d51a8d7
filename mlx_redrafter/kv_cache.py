"""KV cache written by position (gpt-fast style): `KVCache` for plain decoding and prefill,
`SlotCache` for speculative decoding (commit by mask, see its docstring).

Each layer keeps one growing buffer of shape (B, kv_heads, capacity, head_dim),
capacity a multiple of 256. `length` is the write pointer: a forward pass
writes its n new keys at [length, length + n), attends over [0, length + n)
(or over a fixed `span` of slots, masked, see `span_for`) and advances
`length` by n. Positions are explicit (RoPE is applied before the write), so
a slot's index need not equal its token's position.
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

    def take(self, order: mx.array):
        """Reorder each row's slots: order (B, capacity') of slot indices; slots past it keep theirs."""
        index = order[:, None, :, None]
        n = order.shape[1]
        self.keys[..., :n, :] = mx.take_along_axis(self.keys[..., :n, :], index, axis=2)
        self.values[..., :n, :] = mx.take_along_axis(self.values[..., :n, :], index, axis=2)

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

    def allocate(self, n: int) -> int:
        """The first of n slots for a forward pass to write, at the write pointer, which moves past them."""
        start = self.length
        self.length += n
        return start

    def truncate(self, length: int):
        self.length = length

    def keep_rows(self, rows: mx.array):
        """Keep only these batch rows (indices into the batch) in every layer."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def state(self) -> List[mx.array]:
        return [a for layer in self.layers for a in layer.state()]


def device_span_step() -> int:
    """Attended key spans round up to this many slots: 256 on a GPU (every new attention shape
    builds kernels or a cuDNN graph, ~25 ms on MLX CUDA), 32 on the CPU (where attention cost
    grows with the span and no kernels are built)."""
    from .backend import on_gpu

    return 256 if on_gpu() else 32


class SlotCache(KVCache):
    """K/V slots for speculative decoding, where commit is a mask update, not a copy.

    Every step writes its whole tree at the write pointer `length` (a host int,
    the same for all rows) and advances it; the accepted nodes' slots are then
    marked in `valid` (B, capacity) and the rest are never attended again.
    Positions are explicit, so a committed token's slot does not need to match
    its position. `compact` gathers each row's valid slots to the front, once
    the stale slots since the last compaction pass `slack`:

        committed [t0 t1 t2], tree at 3..8 [g0 a b c d e], path g0 b d accepted
        valid     [1  1  1  1 0 1 0 1 0]   lengths 6, write pointer 9
        compact   [t0 t1 t2 g0 b d ...]    valid [1 1 1 1 1 1 0 ...], pointer 6

    `lengths` (B,) on the device counts committed tokens per row; the host keeps
    `bound` >= max(lengths) without reading the device. On a GPU the attended
    span rounds up to 256 slots (each new shape builds kernels); on a CPU,
    where attention cost grows with the span, to 32, and compaction comes sooner.
    """

    def __init__(self, num_layers: int, slack: int = 256, span_step: int = LayerKV.step):
        super().__init__(num_layers)
        self.slack = slack  # stale slots allowed before a compaction
        self.span_step = span_step  # attended slots round up to this (a GPU builds kernels per shape; a CPU does not)
        self.valid: Optional[mx.array] = None  # (B, capacity) bool
        self.lengths: Optional[mx.array] = None  # (B,) int32
        self.bound = 0

    def start(self, prompt_lengths: List[int]):
        """After a prefill of right-padded prompts (written at slots 0..max - 1)."""
        self.lengths = mx.array(prompt_lengths, dtype=mx.int32)
        self.bound = max(prompt_lengths)
        self.valid = mx.arange(self.span_for(self.length))[None] < self.lengths[:, None]

    def reserve(self, n: int):
        """Hand out the n slots of the next tree: (view, valid), where view is a `SlotView` of the
        buffers writing at the pointer and valid (B, span) the committed slots the tree may attend."""
        start = self.allocate(n)
        span = -(-self.length // self.span_step) * self.span_step
        for layer in self.layers:
            if layer.keys.shape[2] < span:
                layer._grow(layer.keys, span)
        if self.valid.shape[1] < span:
            self.valid = mx.pad(self.valid, [(0, 0), (0, span - self.valid.shape[1])])
        return SlotView(self.state(), mx.array(start, dtype=mx.int32)), self.valid[:, :span]

    def store(self, view: "SlotView"):
        """Take back the buffers a forward over `view` wrote."""
        for layer, (keys, values) in zip(self.layers, view.pairs()):
            layer.keys, layer.values = keys, values

    def commit(self, keep: mx.array, counts: mx.array, most: int):
        """After a tree of n nodes was written at the pointer (already advanced past it):
        keep (B, n) marks the committed nodes, counts (B,) how many; most >= max(counts)."""
        n = keep.shape[1]
        start = self.length - n
        self.valid[:, start:self.length] = keep
        self.lengths = self.lengths + counts
        self.bound += most

    def keep_rows(self, rows: mx.array):
        super().keep_rows(rows)
        if self.valid is not None:
            self.valid, self.lengths = self.valid[rows], self.lengths[rows]

    def maybe_compact(self, upcoming: int):
        """Compact when the next `upcoming` slots would pass bound + slack."""
        if self.length + upcoming <= self.bound + self.slack:
            return
        self.compact()
        self.length = self.bound

    def compact(self):
        """Gather each row's committed slots to the front, in slot order, which is position order:
        a tree's nodes are written after the committed slots, and a node after its ancestors."""
        capacity = self.valid.shape[1]
        slots = mx.arange(capacity)
        order = mx.argsort(mx.where(self.valid, slots, capacity + slots), axis=1)  # valid slots first, in order
        for layer in self.layers:
            layer.take(order)
        self.valid = slots[None] < self.lengths[:, None]

    def truncate(self, length: int):
        """Keep the first `length` committed tokens of every row (all rows must have that many),
        contiguous at slots [0, length): a prefill can continue from there (`Decoder.prefill`)."""
        if self.valid is not None:
            self.compact()
        self.length = self.bound = length
        self.lengths = mx.full(self.lengths.shape, length, mx.int32) if self.lengths is not None else None
        self.valid = None if self.valid is None else mx.arange(self.valid.shape[1])[None] < length


class SlotView:
    """Slot buffers as plain arrays with the write pointer on the device, so that a forward
    over a tree can be one `mx.compile`d graph (a host int start would retrace every step).

    buffers: [k0, v0, k1, v1, ...] each (B, kv_heads, capacity, D); start: () int32.
    """

    def __init__(self, buffers: List[mx.array], start: mx.array):
        self.layers = [_ViewLayer(k, v) for k, v in zip(buffers[::2], buffers[1::2])]
        self.start = start

    def allocate(self, n: int) -> mx.array:
        return self.start

    def tree_mask(self, ancestors: mx.array, valid: mx.array) -> mx.array:
        """(B, 1, n, span) bool: the committed slots valid (B, span) plus each node's ancestors
        (B, n, n), which sit at [start, start + n)."""
        B, n, _ = ancestors.shape
        tree = mx.slice_update(mx.zeros((B, n, valid.shape[1]), mx.bool_), ancestors, self.start[None], axes=(2,))
        return (valid[:, None] | tree)[:, None]

    def pairs(self):
        return [(layer.keys, layer.values) for layer in self.layers]

    def state(self) -> List[mx.array]:
        return [a for pair in self.pairs() for a in pair]


class _ViewLayer:
    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values

    def write(self, keys: mx.array, values: mx.array, start: mx.array, span: int):
        self.keys = mx.slice_update(self.keys, keys, start[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, start[None], axes=(2,))
        return self.keys[..., :span, :], self.values[..., :span, :]
