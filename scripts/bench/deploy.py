"""Section "deploy": the exported classifier in onnxruntime (CPU) vs the eager model, batch 1 and 8."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.table import fmt_table


def deploy_section(args):
    """Median latency of the eager LightningModule, its folded copy and the ONNX file in onnxruntime, interleaved."""
    import onnxruntime

    from lightning_frozenbn import FrozenBNClassifier
    from lightning_frozenbn.export import deployable, export_onnx

    torch.manual_seed(0)
    model = FrozenBNClassifier(num_classes=10, arch=args.arch).eval()
    folded = deployable(model)
    size = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(folded, torch.randn(2, 3, size, size), Path(tmp) / "m.onnx", {})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        rows = []
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size)
            runs = {
                "eager (the LightningModule)": lambda x=x: model(x),
                "eager, folded copy (deployable)": lambda x=x: folded(x),
                "onnxruntime CPU": lambda x=x: session.run(None, {name: x.numpy()}),
            }
            times = {k: [] for k in runs}
            with torch.no_grad():
                for fn in runs.values():
                    for _ in range(args.warmup + 1):
                        fn()
                for _ in range(args.rounds):
                    for key, fn in runs.items():
                        for _ in range(args.steps):
                            start = time.perf_counter()
                            fn()
                            times[key].append(time.perf_counter() - start)
            eager = statistics.median(times["eager (the LightningModule)"])
            for key, values in times.items():
                ms = statistics.median(values)
                rows.append(
                    {"variant": key, "batch": batch, "ms": ms * 1e3, "over_eager": ms / eager, "runs": len(values)}
                )
    return rows


def run(ctx):
    return deploy_section(ctx.args)


def report(ctx, rows):
    a = ctx.args
    return (
        f"## Deployment: {a.arch} classifier, {a.image_size} px, CPU, {torch.get_num_threads()} threads; "
        "over_eager < 1: faster than the eager LightningModule\n"
        + fmt_table(rows, ["variant", "batch", "ms", "over_eager", "runs"])
    )
