"""A rank's training and validation batches: an in-memory shard, or Ray Data's stream.

Both give ``train_batches(epoch, local_batch, gen, skip, after_order)``: the epoch's
batches in its seeded order, from batch ``skip`` on for an epoch resumed from a position
(``trainers.position``).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from trainers.augment import alternating_flips
from trainers.config import TrainRunConfig
from trainers.data import ImageData, Split
from trainers.streaming import torch_batches

if TYPE_CHECKING:
    from trainers.loop import WorkerContext

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # uint8 images, labels, flips or None


def split_batches(split: Split, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An in-memory split in order, for evaluation."""
    for start in range(0, len(split), batch_size):
        yield split.x[start:start + batch_size], split.y[start:start + batch_size]


class MemoryInputs:
    """A rank's shard of an in-memory set, on its device: shuffled with ``randperm`` each
    epoch and gathered batch by batch."""

    def __init__(self, data: ImageData, ctx: "WorkerContext", cfg: TrainRunConfig):
        train = data.train.shard(ctx.rank, ctx.world_size, equal=True)
        val = data.val.shard(ctx.rank, ctx.world_size, equal=False)
        self.train = Split(train.x.to(ctx.device), train.y.to(ctx.device))
        self.val = Split(val.x.to(ctx.device), val.y.to(ctx.device))
        self.rows, self.cfg, self.seed = len(self.train), cfg, cfg.train.seed * 100_003 + ctx.rank

    def train_batches(self, epoch: int, local_batch: int, gen: torch.Generator, skip: int = 0,
                      after_order: Callable[[], None] | None = None) -> Iterator[Batch]:
        """``skip`` batches and ``after_order`` (puts a position's RNG states back): a resumed epoch."""
        shard = self.train
        flips = (alternating_flips(len(shard), epoch, self.seed, shard.x.device)
                 if self.cfg.augment.alternate_flip else None)
        order = torch.randperm(len(shard), device=shard.x.device, generator=gen)
        if after_order is not None:
            after_order()
        for idx in order.split(local_batch)[skip:]:
            # index_select, not shard.x[idx]: advanced indexing is ~20x slower on CPU.
            yield (shard.x.index_select(0, idx), shard.y.index_select(0, idx),
                   None if flips is None else flips.index_select(0, idx))

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return split_batches(self.val)


class StreamedInputs:
    """A rank's shards of a set streamed by Ray Data (``trainers.streaming``): its train and
    val iterators (``ray.train.get_dataset_shard``, or Datasets in a one-worker trial)."""

    def __init__(self, plan, train, val, ctx: "WorkerContext", cfg: TrainRunConfig):
        self.plan, self.train, self.val, self.ctx, self.cfg = plan, train, val, ctx, cfg
        self.rows = max(1, math.ceil(plan.train_rows / ctx.world_size))  # for the schedule's length

    def train_batches(self, epoch: int, local_batch: int, gen: torch.Generator, skip: int = 0,
                      after_order: Callable[[], None] | None = None) -> Iterator[Batch]:
        """A resumed epoch skips the first ``skip`` batches of its shard: the epoch keeps its
        length, but which images those were is Ray Data's to decide (docs/train.md)."""
        seed = self.cfg.train.seed * 100_003 + epoch * 1009 + self.ctx.rank
        if after_order is not None:
            after_order()
        batches = torch_batches(self.train, local_batch, self.ctx.device, self.cfg.data.shuffle_buffer, seed)
        for x, y in itertools.islice(batches, skip, None):
            yield x, y, None

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return torch_batches(self.val, 1024, self.ctx.device)
