"""Data order as a pure function of (seed, batches consumed), so a resumed run sees exactly the
batches the uninterrupted run would have seen (Lightning restarts a plain loader's epoch)."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Epoch e is the permutation seeded by (seed, e); starts `start_batch` batches in.

    `batch_size` is the global batch. Under DDP, rank r of `world` yields positions r, r+world,
    ... of every global batch: the ranks together see exactly the single-process batches (each
    sample once per epoch), and `position` tells the module which of the global batch's random
    draws belong to this rank.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world = rank, world
        self.batches_per_epoch = num_samples // batch_size  # drop_last=True
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} training samples < one batch of {batch_size}")
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} does not split over {world} processes")
        self.epoch, offset = divmod(start_batch, self.batches_per_epoch)
        self.offset = offset * batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size // self.world

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        start, self.offset = self.offset, 0
        self.epoch += 1
        return iter(order[start + self.rank:self.batches_per_epoch * self.batch_size:self.world])
