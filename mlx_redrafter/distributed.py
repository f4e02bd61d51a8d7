"""The processes one run is spread over: MLX's own `mx.distributed` group, or this process alone.

`mlx.launch` starts N copies of a command and tells each its rank (ring backend
between Macs or local processes: MLX_RANK + MLX_HOSTFILE; MPI; NCCL between
NVIDIA GPUs: MLX_WORLD_SIZE + NCCL_HOST_IP). `world()` joins that group, or is
a world of one when the command was started plainly, so the same code runs
either way:

    mlx.launch -n 2 -- mlx-redrafter train --out runs/x ...      # 2 local processes, ring backend

Distillation data splits the prompt shards across ranks (distill.py); training
is data parallel, each rank computing the gradient of its slice of every global
batch and the sums added with `mx.distributed.all_sum` (training.py).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_map


@dataclass(frozen=True)
class World:
    """A group of `size` processes, this one being `rank` (group None: this process alone)."""

    group: Optional[object] = None

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes what is shared (checkpoints, the drafter, reports)."""
        return self.rank == 0

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def sum_tree(self, tree):
        """Each array summed over the ranks (a drafter's gradient is a dozen arrays: one message each)."""
        return tree if self.size == 1 else tree_map(self.all_sum, tree)

    def broadcast(self, tree):
        """Rank 0's arrays on every rank (the sum of rank 0's values and everyone else's zeros: exact)."""
        if self.size == 1:
            return tree
        return tree_map(lambda a: self.all_sum(a if self.is_main else mx.zeros_like(a)), tree)

    def agree(self, ok: bool) -> bool:
        """Rank 0's verdict on every rank, so that a refusal stops all of them (not rank 0 alone, the rest
        waiting forever in the next collective)."""
        return ok if self.size == 1 else bool(self.broadcast(mx.array(int(ok))).item())

    def barrier(self):
        """Return once every rank has come here (a collective that cannot finish earlier)."""
        if self.size > 1:
            mx.eval(self.all_sum(mx.array(1.0)))

    def part(self, items: list) -> list:
        """This rank's contiguous share of `items`, whose length the size divides."""
        share = len(items) // self.size
        return items[self.rank * share: (self.rank + 1) * share]


SINGLE = World()


@lru_cache(maxsize=None)
def world() -> World:
    """The group `mlx.launch` started this process in, else a world of one (mx.distributed.init's singleton)."""
    group = mx.distributed.init()
    return World(group) if group.size() > 1 else SINGLE
