"""Averaging across DDP ranks the gradients DDP's reducer never sees: parameters released after it wrapped the model."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ReleasedGradients"]


class ReleasedGradients:
    """Average the gradients of trainable parameters that DDP's reducer does not synchronise.

    ``DistributedDataParallel`` registers, once, the parameters that require grad when it wraps the model.
    A parameter unfrozen later (``BaseFinetuning``, ``FrozenModuleGuard.release``, FinetuningScheduler's
    phases) trains on each rank's own gradients: every rank ends with another model and rank 0's is
    saved. Re-wrapping the model would mean private strategy APIs and a new reducer mid-epoch; instead
    these gradients are averaged here, once per optimizer step, right before it (Lightning's
    ``on_before_optimizer_step``: after the backward passes of gradient accumulation, before clipping),
    which is what the reducer does with the accumulated gradients of the parameters it knows. One
    flattened ``all_reduce`` in parameter-name order; a gradient that is None on some ranks counts as zeros
    there, and one that is None on every rank stays None (the optimizer skips it, as it would).
    """

    def __init__(self) -> None:
        self._reduced: set[int] | None = None  # ids of the parameters DDP's reducer averages; None: not DDP
        self.averaged_steps = 0

    def start(self, strategy: Any, world_size: int) -> None:
        """Note what DDP's reducer covers: call right after the strategy wrapped the model (``on_fit_start``)."""
        model = getattr(strategy, "model", None)
        if world_size > 1 and isinstance(model, DistributedDataParallel) and dist.is_initialized():
            self._reduced = {id(p) for p in model.parameters() if p.requires_grad}
        else:
            self._reduced = None

    def stop(self) -> None:
        """After fit: nothing to average."""
        self._reduced = None

    def unreduced(self, model: nn.Module, optimizer: Any) -> list[tuple[str, nn.Parameter]]:
        """The parameters of ``optimizer`` that train but that DDP's reducer does not average, by name."""
        if self._reduced is None:
            return []
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [
            (name, p)
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) in in_optimizer and id(p) not in self._reduced
        ]

    def average(self, model: nn.Module, optimizer: Any, world_size: int) -> int:
        """Average the unreduced gradients of ``optimizer``'s parameters over the ranks; how many were averaged.

        Every rank calls it at the same point (a hook), with the same parameters (the guard checks that the
        ranks released the same tensors).
        """
        params = [p for _, p in self.unreduced(model, optimizer)]
        if not params:
            return 0
        device = params[0].device
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        params = [p for p, h in zip(params, has_grad.tolist()) if h]
        if not params:
            return 0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        with torch.no_grad():
            for p in params:
                part = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = part.clone()
                else:
                    p.grad.copy_(part)
        self.averaged_steps += 1
        return len(params)
