"""The finite-loss check: every rank stops together at the first non-finite training loss, now or one step later."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeferredFiniteCheck", "check_finite_now"]

_FIX = "Lower the learning rate (`model.optimizer.init_args.lr`), check the input data"


def check_finite_now(loss: Tensor, strategy: Any, where: str, rank: int) -> None:
    """Stop every rank, before the backward pass, when the loss is not finite on any rank (a host sync)."""
    finite = bool(torch.isfinite(loss).all())
    if not strategy.reduce_boolean_decision(finite, all=True):
        value = loss.item() if finite is False else "finite here, non-finite on another rank"
        raise FloatingPointError(
            f"Training loss is not finite at {where}: {value} (rank {rank}). {_FIX}, or resume from an earlier "
            "checkpoint."
        )


class DeferredFiniteCheck:
    """``check_finite="deferred"``: each step's flag is read at the next step, so the GPU queue never drains.

    The flag is copied to pinned host memory behind an event, both queued on the stream; the next step
    waits for that event only (not for the work queued since), then reads it. A plain ``.item()`` at the
    next step would wait for everything queued: a full sync, as measured.
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, Any, Tensor, str] | None = None

    def queue(self, loss: Tensor, world_size: int, where: str, rank: int) -> None:
        """Settle the previous step's flag, then queue this step's (summed over ranks, no barrier)."""
        finite = torch.isfinite(loss.detach()).all().int()
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite)  # not strategy.reduce: it puts a blocking barrier first
        event = None
        if finite.is_cuda:
            host = torch.empty((), dtype=torch.int32, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite = host
        self.settle(world_size, rank)
        self._pending = (finite, event, loss.detach(), where)

    @property
    def pending(self) -> bool:
        """A step's flag is queued and not read yet."""
        return self._pending is not None

    def settle(self, world_size: int, rank: int) -> None:
        """Read the queued flag (if any) and stop every rank alike when a rank's loss was not finite."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        finite, event, loss, where = pending
        if event is not None:
            event.synchronize()
        if int(finite) != world_size:  # every rank reads the same reduced count
            value = loss.item() if not torch.isfinite(loss) else "finite here, non-finite on another rank"
            raise FloatingPointError(
                f"Training loss is not finite at {where}: {value} (rank {rank}; found one step later: "
                f"check_finite='deferred', so the weights already carry that step). {_FIX}, and resume from a "
                "checkpoint saved before that step."
            )
