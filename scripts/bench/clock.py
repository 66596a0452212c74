"""Steady time per step of a Lightning fit: the clock callback and the Trainer both trainer sections use."""

from __future__ import annotations

import time

import torch


class _StepClock:
    """Lightning callback: the steady time per step, from the wall clock over a run's steps after the first ``skip``.

    The device is synchronised only where the timed span starts and ends: a sync every step would
    hide the cost of anything else that syncs (the NaN check, a logger) and would let a slow input
    pipeline hide behind the model. Epoch times (with a sync at each end) are kept too.
    """

    def __init__(self, skip=1):
        from lightning.pytorch import Callback

        clock = self

        def sync(trainer):
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == skip:
                    sync(trainer)
                    clock.t0 = time.perf_counter()

            def on_train_end(self, trainer, pl_module):
                sync(trainer)
                if clock.t0 is not None and trainer.global_step > skip:
                    clock.steps.append((time.perf_counter() - clock.t0) / (trainer.global_step - skip))
                clock.t0 = None

            def on_train_epoch_start(self, trainer, pl_module):
                sync(trainer)
                clock.e0 = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                sync(trainer)
                clock.epochs.append(time.perf_counter() - clock.e0)

        self.callback, self.steps, self.epochs, self.t0, self.e0 = _Cb(), [], [], None, 0.0


def _bench_trainer(device, precision, callbacks, **limits):
    """A Trainer with nothing but the model step and the given callbacks (no logger, checkpoint, bar)."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=device.type if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        **limits,
    )
