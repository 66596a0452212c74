"""FrozenEMA: Lightning's weight averaging with an EMA that leaves frozen tensors bit-identical."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from typing_extensions import override

__all__ = ["FrozenEMA", "lerp_ema"]


def lerp_ema(decay: float) -> Any:
    """The EMA update ``ema + (1 - decay) * (current - ema)`` as ``torch.lerp``: exact on unchanged tensors.

    Why not ``torch.optim.swa_utils.get_ema_avg_fn``: it computes ``decay * ema + (1 - decay) * current``,
    which for a tensor that never changes (a frozen weight, a FrozenBatchNorm2d statistic) moves it by
    a rounding error at every update. The averaged model then differs from the frozen one in the last
    bits; its checkpoint no longer matches the guard's checksums, and resuming from it is refused.
    ``lerp`` returns ``ema`` exactly when ``current == ema``. Integer buffers take the current value.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r} is invalid: expected a value in [0, 1] (e.g. 0.999).")

    @torch.no_grad()
    def update(ema: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        if not ema.is_floating_point():
            return current
        return torch.lerp(ema, current.to(ema.dtype), 1.0 - decay)

    return update


class FrozenEMA(WeightAveraging):
    """Exponential moving average of the weights, for models with frozen parts (use it with the guard).

    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` with :func:`lerp_ema` as the
    averaging function: the averaged copy of every frozen tensor equals the tensor bit for bit, so the
    averaged weights that validation uses and that the checkpoints hold pass the FrozenModuleGuard's
    checks, on resume too. Same arguments and schedule as Lightning's callback.

    Args:
        device: where the averaged model lives (default: the model's device; "cpu" saves GPU memory).
        use_buffers: average buffers too (frozen statistics stay exact either way).
        decay: EMA decay per update.
        update_every_n_steps: update after every N optimizer steps.
        update_starting_at_step: first step that updates (None: from the start).
        update_starting_at_epoch: also update at the end of epochs from this one on (None: never).
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
    ) -> None:
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=lerp_ema(decay))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Lightning's EMA schedule: every N steps from a start step, and optionally at epoch ends."""
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0:
                return True
        if epoch_idx is not None:
            return self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch
        return False
