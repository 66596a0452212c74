"""Cross-rank agreement on the frozen state: every collective the guard makes, each a no-op at world size 1."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_frozenbn.errors import FrozenStateViolation

__all__ = ["Consensus"]


class Consensus:
    """What the ranks agree on. Every method is called on every rank at the same point (hooks are).

    Decisions go through the strategy's ``reduce_boolean_decision``, so no rank waits for another that
    decided otherwise; fingerprints and name digests are compared with one ``all_reduce`` each; only when
    something differs are reports and name lists gathered (objects) to say which rank.
    """

    def __init__(self, strategy: Strategy, rank: int, world_size: int) -> None:
        self.strategy = strategy
        self.rank = rank
        self.world_size = world_size

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @classmethod
    def of(cls, trainer: Any) -> Consensus:
        """The consensus of ``trainer``'s ranks."""
        return cls(trainer.strategy, trainer.global_rank, trainer.world_size)

    def all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank."""
        if self.world_size <= 1:
            return ok
        return bool(self.strategy.reduce_boolean_decision(ok, all=True))

    def local(self) -> Consensus:
        """This rank alone: the same API, no collective (for checks after the ranks stopped talking)."""
        return Consensus(self.strategy, self.rank, 1)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (``[value]`` alone)."""
        if not self._distributed:
            return [value]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, value)
        return everyone

    def check_same_names(self, names: list[str], what: str) -> None:
        """Every rank must guard (or release) the same tensors: else stop on every rank, naming the ranks."""
        if not self._distributed:
            return
        digest = zlib.crc32("\n".join(sorted(names)).encode()) & 0x7FFFFFFF
        if not self._differs(torch.tensor([digest], dtype=torch.int64)).any():
            return
        everyone = self.gather_objects(sorted(names))
        lines = [
            f"  rank {r}: {len(n)} tensors {what}, differs from rank 0 in "
            f"{', '.join(sorted(set(n) ^ set(everyone[0]))[:5])}"
            for r, n in enumerate(everyone)
            if r and n != everyone[0]
        ]
        raise FrozenStateViolation(
            f"FrozenModuleGuard: the ranks do not agree on the {what} tensors:\n" + "\n".join(lines) + "\nEvery "
            "rank must freeze, unfreeze and release the same modules at the same point (rank-dependent code?)."
        )

    def diverged(self, names: list[str], fingerprints: Tensor, what: str = "frozen") -> list[str]:
        """One line per rank whose ``what`` tensors (frozen, trainable) differ from rank 0's (by checksum).

        Called after :meth:`check_same_names`: with nothing guarded on this rank, nothing is on any, and an
        empty gather is not made (gloo's empty all_gather aborted spawned processes at exit).
        """
        if self.world_size <= 1 or fingerprints.numel() == 0:
            return []
        if not self._differs(fingerprints).any():  # the usual answer, from one all_reduce
            return []
        gathered = self.gather_objects(fingerprints.cpu())  # which ranks: only once something differs
        lines = []
        for r in range(1, self.world_size):
            rows = (gathered[r] != gathered[0]).any(dim=-1).nonzero().flatten().tolist()
            if rows:
                shown = ", ".join(names[i] for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
                state = "a different frozen state" if what == "frozen" else f"different {what} parameters"
                lines.append(f"rank {r} holds {state} than rank 0 in {len(rows)} tensors: {shown}")
        return lines

    def _differs(self, values: Tensor) -> Tensor:
        """Which elements of an int64 tensor are not the same on every rank: one all_reduce (MAX of v and -v).

        The ranks' common path uses all_reduce only, as Lightning's own syncing does: all_gathers made
        every epoch left spawned gloo processes aborting at exit in Lightning's own DDP tests.
        """
        both = torch.stack([values, -values]).to(self.strategy.root_device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return (both[0] != -both[1]).cpu()

    def broadcast_from_zero(self, tensors: list[Tensor]) -> None:
        """Make every rank's tensors rank 0's, in place."""
        if self._distributed:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
