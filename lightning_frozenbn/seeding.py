"""Per-step seeds: a training step's random draws depend on (seed, epoch, batch, rank), not on the run's history."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["seed_step", "step_seed"]


def step_seed(base: int, epoch: int, batch: int, rank: int) -> int:
    """A 63-bit seed for one training batch of one rank, independent of every other (base, epoch, batch, rank).

    Why: the detector samples regions with torch's global generator, whose state after N steps depends
    on everything drawn before (validation loaders, calibration, the sizes of earlier samples). A run
    resumed from a checkpoint starts that generator elsewhere, so from the first resumed epoch on its
    losses drift from the uninterrupted run's. Seeding each step from its coordinates makes the draws of
    step (epoch, batch) the same in both runs, on every rank, whatever came before.
    """
    key = f"{base}:{epoch}:{batch}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seed_step(base: int, epoch: int, batch: int, rank: int) -> None:
    """Seed torch's generators (CPU and every CUDA device) for this step: see :func:`step_seed`."""
    torch.manual_seed(step_seed(base, epoch, batch, rank))
