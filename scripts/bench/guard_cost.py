"""Section "guard": the FrozenModuleGuard's overhead on an epoch."""

from __future__ import annotations

import statistics
import time

import torch

from bench.clock import _bench_trainer, _StepClock
from bench.table import fmt_table
from lightning_frozenbn import FrozenBNClassifier, FrozenModuleGuard


def guard_overhead(args, device, x, y):
    """Epoch time with vs without the guard (interleaved), and the guard's own hook time per epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(x.cpu().repeat(args.steps, 1, 1, 1), y.cpu().repeat(args.steps)), batch_size=x.shape[0]
    )
    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    model = FrozenBNClassifier(num_classes=1000, arch=args.arch, check_finite=False, channels_last=args.channels_last)
    with_guard, without, hook_time = [], [], []
    for _ in range(args.rounds):
        for use_guard in (True, False):
            clock = _StepClock()
            guard = FrozenModuleGuard()
            spent = [0.0]
            for hook in ("on_train_batch_start", "on_train_epoch_start", "on_train_epoch_end"):
                original = getattr(guard, hook)

                def timed(*a, _original=original, spent=spent, **k):
                    t0 = time.perf_counter()
                    _original(*a, **k)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    spent[0] += time.perf_counter() - t0

                setattr(guard, hook, timed)
            callbacks = [clock.callback, guard] if use_guard else [clock.callback]
            _bench_trainer(device, precision, callbacks, max_epochs=2).fit(model, loader)
            (with_guard if use_guard else without).extend(clock.epochs[1:])
            if use_guard:
                hook_time.append(spent[0] / 2)
    epoch = statistics.median(without)
    return {
        "epoch_s_with_guard": statistics.median(with_guard),
        "epoch_s_without": epoch,
        "epoch_ratio": statistics.median(with_guard) / epoch,
        "guard_hook_s_per_epoch": statistics.median(hook_time),
        "guard_hook_fraction_of_epoch": statistics.median(hook_time) / epoch,
        "steps_per_epoch": args.steps,
    }


COLUMNS = [
    "epoch_s_with_guard",
    "epoch_s_without",
    "epoch_ratio",
    "guard_hook_s_per_epoch",
    "guard_hook_fraction_of_epoch",
    "steps_per_epoch",
]


def run(ctx):
    return guard_overhead(ctx.args, ctx.device, ctx.x, ctx.y)


def report(ctx, row):
    return "## FrozenModuleGuard overhead (epoch time with/without, and the guard hooks' own time)\n" + fmt_table(
        [row], COLUMNS
    )
