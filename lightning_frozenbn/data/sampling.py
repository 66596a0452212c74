"""EpochShuffleSampler: a permutation per epoch drawn from ``seed + epoch``, so the order survives a resume."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``: the order survives a resume.

    PyTorch's RandomSampler draws from a generator that restarts with the DataLoader, so a run
    resumed at epoch 3 would see epoch 0's order again. Lightning calls ``set_epoch`` on samplers
    that have it (as it does for DistributedSampler), so here epoch *k* has the same order whether
    the run was interrupted or not.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
