"""Training data order as a pure function of (seed, global step), so a resumed run sees exactly the batches an
uninterrupted run would have seen.

A plain shuffled DataLoader restarts its epoch from the first batch when training resumes mid-epoch (Lightning
warns about it): the batches already seen in that epoch are seen again and the trajectory departs from the
uninterrupted run. ``StepSampler`` derives everything from the trainer's global step at the moment an epoch's
iterator starts: the epoch ``e = step // P`` (``P`` batches per epoch and rank), its permutation (seeded by
``(seed, e)``), and how many of its batches were already trained on (``step % P``, skipped). It also does the split
across data-parallel ranks itself (as ``DistributedSampler`` would: a disjoint, equal share per rank, the remainder
dropped), so the Trainer must not inject a distributed sampler (``use_distributed_sampler=False``). One optimizer
step per batch is assumed (no gradient accumulation), which is what the training CLI does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepSampler(Sampler[int]):
    """Dataset indices for this rank, for the epoch and offset that the current global step implies.

    ``step_source`` returns the number of optimizer steps already taken (``lambda: trainer.global_step``); it is
    read each time an epoch's iteration starts, after Lightning has restored a checkpoint. Use with
    ``DataLoader(..., batch_size=B, sampler=StepSampler(n, B, seed), drop_last=True)``.
    """

    def __init__(self, size: int, batch_size: int, seed: int, step_source: Callable[[], int] | None = None):
        if size <= 0 or batch_size <= 0:
            raise ValueError(f"StepSampler needs size > 0 and batch_size > 0, got {size}, {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.step_source = step_source

    def batches_per_epoch(self) -> int:
        """Full batches each rank gets per epoch (the remainder of the permutation is dropped)."""
        return self.size // (self.batch_size * _world()[1])

    def __len__(self) -> int:
        # The full epoch, also when resuming inside it: Lightning counts an epoch's batches from this.
        return self.batches_per_epoch() * self.batch_size

    def epoch_indices(self, epoch: int, rank: int, world: int) -> list[int]:
        """The indices rank ``rank`` of ``world`` trains on in ``epoch`` (all of its batches, in order)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        per_rank = self.size // (self.batch_size * world) * self.batch_size
        return order[: per_rank * world][rank::world].tolist()

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) for the current global step."""
        per_epoch = self.batches_per_epoch()
        if per_epoch == 0:
            raise ValueError(f"{self.size} samples are fewer than one batch of {self.batch_size} per rank on "
                             f"{_world()[1]} ranks")
        step = int(self.step_source()) if self.step_source is not None else 0
        return divmod(step, per_epoch)

    def __iter__(self) -> Iterator[int]:
        rank, world = _world()
        epoch, done = self.position()
        logger.debug("data order: rank %d of %d, epoch %d from batch %d of %d", rank, world, epoch, done,
                     self.batches_per_epoch())
        yield from self.epoch_indices(epoch, rank, world)[done * self.batch_size:]
