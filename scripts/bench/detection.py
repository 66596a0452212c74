"""Section "detection": the Faster R-CNN C4 training step, folded vs unfolded vs torchvision's FPN."""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

from bench.table import fmt_table


# ---- detection: the Faster R-CNN C4 step, ours vs the same detector unfolded vs torchvision's FPN recipe ----
def detection_variants(args):
    """(name, model) pairs: ours (folded), ours with torchvision's FrozenBatchNorm2d unfolded, torchvision's FPN."""
    from lightning_frozenbn import FrozenBNDetector

    common = dict(min_size=args.det_size, max_size=args.det_size * 2)
    c4 = dict(
        arch=args.arch,
        box_batch_size_per_image=args.det_regions,
        rpn_post_nms_top_n_train=max(args.det_regions * 2, 256),
        roi_output_size=args.det_roi,
        **common,
    )
    torch.manual_seed(0)
    ours = FrozenBNDetector(args.det_classes, fold=True, **c4)
    unfolded = FrozenBNDetector(args.det_classes, fold=False, **c4)
    unfolded.load_state_dict(ours.state_dict())  # same weights; the folded keys are the same names
    fpn = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=args.det_classes + 1,
        trainable_backbone_layers=3,  # torchvision's fine-tuning default: stem + layer1 frozen, as ours
        box_batch_size_per_image=args.det_regions,
        **common,
    )
    return [
        ("ours C4 (folded)", ours),
        ("C4, torchvision FrozenBN", unfolded),
        ("torchvision fasterrcnn_resnet50_fpn", fpn),
    ]


def detection_scenes(args, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = args.det_size
    images = [torch.rand(3, size, size + 32 * (i % 2), generator=g).to(device) for i in range(args.det_batch)]
    targets = []
    for _ in range(args.det_batch):
        k = 3
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = torch.rand(k, 2, generator=g) * size * 0.3 + size * 0.08
        boxes = torch.cat([xy, xy + wh], 1).to(device)
        targets.append({"boxes": boxes, "labels": torch.randint(1, args.det_classes + 1, (k,), generator=g).to(device)})
    return images, targets


def detection_section(args, device, variants=detection_variants):
    """Training step time and saved-for-backward bytes of the ``variants(args)`` detectors, side by side.

    The first variant named "ours ..." is the reference of the ratio columns.
    """
    images, targets = detection_scenes(args, device)
    models = [(n, m.to(device).train()) for n, m in variants(args)]
    opts = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models}
    rows = []
    for precision in args.precisions.split(","):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step(name, model, autocast=autocast):
            torch.manual_seed(1)  # the same region sampling for every variant
            with autocast:
                loss = sum(model(images, targets).values())
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

        times = {n: [] for n, _ in models}
        peaks = {}
        for name, model in models:
            for _ in range(args.warmup):
                step(name, model)
        for _ in range(args.rounds):
            for name, model in models:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(args.det_steps):
                    start = time.perf_counter()
                    step(name, model)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        for name, model in models:
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            torch.manual_seed(1)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                model(images, targets)
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "ms_per_step": statistics.median(times[name]) * 1e3,
                    "saved_mib_excl_params": sum(n for p, n in seen.items() if p not in params) / 2**20,
                    "peak_gib": peaks[name] / 2**30 if name in peaks else None,
                    "steps": len(times[name]),
                }
            )
        ours = next(r for r in rows if r["precision"] == precision and r["variant"].startswith("ours"))
        for r in rows:
            if r["precision"] == precision:
                r["ours_time_over_this"] = ours["ms_per_step"] / r["ms_per_step"]
                r["ours_saved_over_this"] = ours["saved_mib_excl_params"] / r["saved_mib_excl_params"]
    return rows


COLUMNS = [
    "variant",
    "precision",
    "ms_per_step",
    "ours_time_over_this",
    "saved_mib_excl_params",
    "ours_saved_over_this",
    "peak_gib",
    "steps",
]


def run(ctx):
    return detection_section(ctx.args, ctx.device)


def report(ctx, rows):
    a = ctx.args
    return (
        f"## Faster R-CNN training step: {a.arch} C4, batch {a.det_batch}, {a.det_size} px, {a.det_regions} "
        f"regions/image, RoIAlign {a.det_roi}; ours_*_over_this < 1: ours is faster / saves less\n"
        + fmt_table(rows, COLUMNS)
    )
