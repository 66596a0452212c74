"""Section "lightning": Lightning Trainer.fit step vs a plain PyTorch loop, and the NaN check's cost."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bench.clock import _bench_trainer, _StepClock
from bench.table import fmt_table
from lightning_frozenbn import FrozenBNClassifier


def lightning_vs_plain(args, device, x, y):
    """Time per step: Trainer.fit vs a hand-written loop, same model, same batches, interleaved.

    Lightning runs three times per round: with ``check_finite=False`` (the same work as the plain
    loop, so the ratio is Lightning's own cost), with the package default ``check_finite=True``, whose
    NaN check reads the loss on the host every step (a device sync: free on CPU, measured on GPU), and
    with ``check_finite="deferred"`` (read one step later, no sync). Steady time per step over
    ``2 x steps`` steps after one warm-up step, device synced only at the ends of the span.
    """
    from torch.utils.data import DataLoader

    model = FrozenBNClassifier(num_classes=1000, arch=args.arch, check_finite=False, channels_last=args.channels_last)
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    steps = 2 * args.steps
    precision = "bf16-mixed" if args.fit_precision == "bf16" else "32-true"
    clocks = {False: _StepClock(), True: _StepClock(), "deferred": _StepClock()}
    plain_steps: list[float] = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [(x.cpu(), y.cpu())] * (steps + 1)  # host batches, copied to the device each step as in a real run
    if device.type == "cuda":
        batches = [(x.cpu().pin_memory(), y.cpu().pin_memory())] * (steps + 1)
    for _ in range(args.rounds):
        for check_finite, clock in clocks.items():
            model.hparams.check_finite = check_finite
            trainer = _bench_trainer(device, precision, [clock.callback], max_steps=steps + 1)
            trainer.fit(model, DataLoader(batches, batch_size=None))
        model.to(device).train()
        for i, (xb, yb) in enumerate(batches):
            if i == 1:
                sync()
                t0 = time.perf_counter()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.fit_precision == "bf16"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
        plain_steps.append((time.perf_counter() - t0) / steps)
    lightning = statistics.median(clocks[False].steps)
    checked = statistics.median(clocks[True].steps)
    deferred = statistics.median(clocks["deferred"].steps)
    plain = statistics.median(plain_steps)
    return {
        "lightning_ms": lightning * 1e3,
        "plain_ms": plain * 1e3,
        "ratio": lightning / plain,
        "check_finite_ms": checked * 1e3,
        "check_finite_ratio": checked / lightning,
        "deferred_check_ms": deferred * 1e3,
        "deferred_check_ratio": deferred / lightning,
        "steps": steps,
        "runs": len(clocks[False].steps),
    }


COLUMNS = [
    "lightning_ms",
    "plain_ms",
    "ratio",
    "check_finite_ms",
    "check_finite_ratio",
    "deferred_check_ms",
    "deferred_check_ratio",
    "steps",
    "runs",
]


def run(ctx):
    return lightning_vs_plain(ctx.args, ctx.device, ctx.x, ctx.y)


def report(ctx, row):
    return (
        "## Lightning Trainer.fit step vs plain PyTorch loop (ours, steady time per step, median of runs)\n"
        "(check_finite_ratio: the default NaN check's host sync per step; deferred: read one step later)\n"
        + fmt_table([row], COLUMNS)
    )
