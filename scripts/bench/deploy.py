"""Section "deploy": the exported classifier and C4/FPN detectors in onnxruntime (CPU) vs eager, batch 1 and 8."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.table import fmt_table


def _session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _medians(runs, args, steps):
    """Median seconds per call of each variant, the variants interleaved round by round."""
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            for _ in range(args.warmup + 1):
                fn()
        for _ in range(args.rounds):
            for key, fn in runs.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
    return {k: (statistics.median(v), len(v)) for k, v in times.items()}


def _rows(model_name, batch, medians):
    eager = medians["eager (the LightningModule)"][0]
    return [
        {"model": model_name, "variant": k, "batch": batch, "ms": ms * 1e3, "over_eager": ms / eager, "runs": n}
        for k, (ms, n) in medians.items()
    ]


def deploy_section(args):
    """Median latency of the eager LightningModule, its folded copy and the ONNX file in onnxruntime, interleaved."""
    from lightning_frozenbn import FrozenBNClassifier
    from lightning_frozenbn.export import deployable, export_onnx

    torch.manual_seed(0)
    model = FrozenBNClassifier(num_classes=10, arch=args.arch).eval()
    folded = deployable(model)
    size = args.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(export_onnx(folded, torch.randn(2, 3, size, size), Path(tmp) / "m.onnx", {}))
        name = session.get_inputs()[0].name
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size)
            runs = {
                "eager (the LightningModule)": lambda x=x: model(x),
                "eager, folded copy (deployable)": lambda x=x: folded(x),
                "onnxruntime CPU": lambda x=x: session.run(None, {name: x.numpy()}),
            }
            rows += _rows("classifier", batch, _medians(runs, args, args.steps))
        rows += detector_rows(args, Path(tmp))
    return rows


def detector_rows(args, tmp):
    """The C4 and FPN detectors at ``det_size``: eager on a list of images vs the ONNX file once per image.

    Random weights with ``box_score_thresh=0`` and a fixed number of regions: every image carries the full
    post-processing load (``det_regions`` regions through the box head), as a trained model's would.
    """
    from lightning_frozenbn import FrozenBNDetector, FrozenBNFPNDetector
    from lightning_frozenbn.detection.deployed import DeployedDetector
    from lightning_frozenbn.export import deployable, export_detector_onnx

    rows = []
    size = args.det_size
    settings = dict(
        arch=args.arch,
        weights=None,
        min_size=size,
        max_size=2 * size,
        rpn_post_nms_top_n_test=args.det_regions,
        box_score_thresh=0.0,
    )
    for name, cls in (("C4 detector", FrozenBNDetector), ("FPN detector", FrozenBNFPNDetector)):
        torch.manual_seed(0)
        model = cls(num_classes=args.det_classes, **settings).eval()
        one = DeployedDetector(deployable(model)).eval()
        images = [torch.rand(3, size, size * 4 // 3) for _ in range(8)]
        session = _session(export_detector_onnx(one, images[0], tmp / f"{cls.__name__}.onnx", {}))
        for batch in (1, 8):
            x = images[:batch]
            runs = {
                "eager (the LightningModule)": lambda x=x, m=model: m(x),
                "eager, folded copy (deployable)": lambda x=x, m=one: [m(i) for i in x],
                "onnxruntime CPU": lambda x=x, s=session: [s.run(None, {"image": i.numpy()}) for i in x],
            }
            rows += _rows(name, batch, _medians(runs, args, args.det_steps))
    return rows


def run(ctx):
    return deploy_section(ctx.args)


def report(ctx, rows):
    a = ctx.args
    return (
        f"## Deployment: {a.arch} classifier at {a.image_size} px, detectors at {a.det_size} px "
        f"({a.det_regions} regions), CPU, {torch.get_num_threads()} threads; over_eager < 1: faster than the eager "
        "LightningModule; detectors' batch: images, one ONNX call each\n"
        + fmt_table(rows, ["model", "variant", "batch", "ms", "over_eager", "runs"])
    )
