"""The frozen-BN claims measured on the C4 detector (digits on canvases), offline, on CPU: ``study.py --task detection``.

Start: a ResNet-18 with plain BatchNorm trained to classify the ten digits (32 px crops, the classifier
study's pretraining, all ten classes), saved as a torchvision state dict. Every detector loads it
through ``weights=`` (backbone = stem..layer3, per-region head = layer4), as the detection quickstart
loads its classifier, with the quickstart's geometry (128 px canvases, RoIAlign 4, ``freeze_at=3``).

Claim 1: with per-device batches of 1-8 images (each image hundreds of correlated regions), frozen BN
         fine-tunes a detector better than BN in train mode. Policies x batches x seeds, mAP@50 and mAP
         after the same number of images seen.
Claim 2: with frozen BN, 2-process DDP (B/2 images per rank) computes what one process computes on the
         union of the batches; with train-mode BN it does not. The canvases of one step share their box
         layout (same places, sizes and count, different digits), so that the RPN and box-head losses
         (means over the sampled anchors and regions of a batch) weigh every image alike whichever
         process holds it, and run in float64, so that rounding cannot flip which proposals survive NMS:
         the difference left is the normalisation's.
Claim 3: the source's statistics are far off on canvases; ``calibrate_bn`` re-estimates them. Region
         feature magnitude (the box head's input) and mAP, with and without it.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from lightning_frozenbn import DigitsDetectionDataModule, FrozenBNDetector

POLICIES = ("frozen", "eval", "train")
GEOMETRY = dict(  # the detection quickstart's (configs/detection_quickstart.yaml)
    min_size=128,
    max_size=256,
    anchor_sizes=[24, 32, 48],
    aspect_ratios=[1.0, 2.0],
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=16,
    box_positive_fraction=0.5,
    roi_output_size=4,
)


def detector(
    weights: Path, policy: str, lr: float, calibrate: int = 0, warmup: int = 50, **overrides
) -> FrozenBNDetector:
    return FrozenBNDetector(
        num_classes=10,
        arch="resnet18",
        weights=str(weights),
        norm=policy,
        freeze_at=3,
        calibrate_bn=calibrate,
        warmup_steps=warmup,
        check_finite=False,  # a diverging train-mode run is a result here, not an error
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
        **{**GEOMETRY, **overrides},
    )


def finetune(weights, root, policy, batch, seed, images, calibrate=0, num_train=1200, quick=False) -> dict:
    """mAP@50 and mAP on the validation canvases after ``images`` training images at ``batch`` per step."""
    seed_everything(seed, verbose=False)
    data = DigitsDetectionDataModule(root=root, batch_size=batch, num_workers=0, num_train=num_train, seed=0)
    steps = max(1, images // batch)
    lr = 0.02 * batch / 8  # the quickstart's 0.02 at 8 images, scaled linearly (Detectron's rule)
    model = detector(weights, policy, lr, calibrate=calibrate, warmup=min(50, steps // 4))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=4 if quick else 1.0,
        check_val_every_n_epoch=None,
        val_check_interval=steps,
        gradient_clip_val=10.0,
    )
    started = time.time()
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    row = {
        "policy": policy,
        "batch": batch,
        "seed": seed,
        "steps": steps,
        "images": steps * batch,
        "calibrate_bn": calibrate,
        "map_50": float(metrics.get("val/map_50", float("nan"))),
        "map": float(metrics.get("val/map", float("nan"))),
        "seconds": time.time() - started,
    }
    print(f"  {row}", flush=True)
    return row


# ---- claim 2 ------------------------------------------------------------------------------------
LR2 = 1e-3  # small: uncalibrated statistics and every anchor in the loss make 0.02 diverge in 3 steps


def same_layout_batches(root: Path, steps: int, batch: int) -> list[tuple[list, list]]:
    """Per step, ``batch`` canvases with one box layout: the first canvas's boxes, other digits pasted in.

    Each box is filled with the pixels of another canvas's digit box of the same class-agnostic size
    (resized), so every image of a step has the same anchors' labels and region counts.
    """
    data = DigitsDetectionDataModule(root=root, batch_size=batch, num_workers=0)  # no flips: digits
    data.prepare_data()
    data.setup("fit")
    split = data.datasets["train"]
    out, source = [], 0
    for _ in range(steps):
        base_image, base = split[source]
        source += 1
        images, targets = [base_image], [base]
        while len(images) < batch:
            image, target = split[source]
            source += 1
            canvas = torch.zeros_like(base_image)
            labels = []
            for i, box in enumerate(base["boxes"]):
                x0, y0, x1, y1 = (int(round(v)) for v in box.tolist())
                sx0, sy0, sx1, sy1 = (int(round(v)) for v in target["boxes"][i % len(target["boxes"])].tolist())
                patch = image[:, sy0:sy1, sx0:sx1].float()[None]
                canvas[:, y0:y1, x0:x1] = nn.functional.interpolate(patch, size=(y1 - y0, x1 - x0))[0].to(canvas.dtype)
                labels.append(target["labels"][i % len(target["labels"])])
            images.append(canvas)
            targets.append({**base, "labels": torch.stack(labels)})
        out.append((images, targets))
    return out


def _claim2_worker(rank, world, weights, root, policies, batch, steps, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = same_layout_batches(Path(root), steps, batch)
    per_rank = batch // world
    for policy in policies:
        torch.manual_seed(0)
        # every anchor and every proposal sampled: no random subset differs between the two set-ups
        model = detector(Path(weights), policy, LR2, rpn_batch_size_per_image=4096, box_batch_size_per_image=4096,
                         rpn_post_nms_top_n_train=20)  # fmt: skip
        model.double().train()  # float64: a rounding difference could flip which proposals survive NMS
        module = model
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=policy != "frozen")
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR2, momentum=0.9)
        for images, targets in batches:
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            losses = model(images[mine], targets[mine])
            loss = torch.stack(list(losses.values())).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            trained = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
            torch.save(trained, Path(out) / f"det_claim2_{policy}_{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def claim2(weights: Path, root: Path, out: Path, batch: int = 4, steps: int = 3) -> list[dict]:
    from study import ddp_vs_single

    def start_of(policy: str) -> dict:  # the backbone and head: the box predictor starts from its own seed
        model = detector(weights, policy, LR2)
        return {k: v for k, v in model.named_parameters() if v.requires_grad and "predictor" not in k}

    policies = ("frozen", "train")
    args = (str(weights), str(root), policies, batch, steps)
    return ddp_vs_single(_claim2_worker, args, 29750, out, "det_claim2_", policies, start_of)


# ---- claim 3 ------------------------------------------------------------------------------------
@torch.no_grad()
def region_feature_scale(model: FrozenBNDetector, root: Path, batches: int = 2) -> float:
    """Median L2 norm of the box head's input (layer4 + pooling of RoIAlign on C4) on ground-truth boxes."""
    data = DigitsDetectionDataModule(root=root, batch_size=8, num_workers=0)
    data.setup("validate")
    model.eval()
    norms = []
    for i, (images, targets) in enumerate(data.val_dataloader()):
        if i == batches:
            break
        batch, scaled = model.transform([img.float() / 255 for img in images], copy.deepcopy(targets))
        features = {"0": model.forward_backbone(batch.tensors)}
        boxes = [t["boxes"] for t in scaled]
        regions = model.forward_box_features(model.roi_heads.box_roi_pool(features, boxes, batch.image_sizes))
        norms += regions.flatten(1).norm(dim=1).tolist()
    return statistics.median(norms)


def calibrated_scale(weights: Path, root: Path, calibrate: int) -> float:
    """Region-feature scale of a fresh detector, after ``calibrate_bn`` on ``calibrate`` training batches (0: none)."""
    from lightning_frozenbn import calibrate_bn, fold_frozen_batchnorm

    model = detector(weights, "frozen", 0.02)
    if calibrate:
        data = DigitsDetectionDataModule(root=root, batch_size=8, num_workers=0)
        data.setup("fit")

        def images():
            for imgs, _ in data.train_dataloader():
                batch, _ = model.transform([i.float() / 255 for i in imgs])
                yield batch.tensors

        calibrate_bn(model.backbone, images(), calibrate)
        fold_frozen_batchnorm(model.backbone)
    return region_feature_scale(model, root)


def run(args, weights: Path) -> dict:
    """The detection study; ``weights`` is the pretrained classifier (a torchvision state dict)."""
    root = args.out / "digits_detection"
    quick = args.quick
    batches = (1,) if quick else (1, 2, 8)
    seeds = (0,) if quick else (0, 1, 2)
    images = 24 if quick else 1200  # quick: a smoke run of claim 1 (which does not hold here: see docs/study.md)
    calibration_images = 400 if quick else images  # quick: enough steps for calibration's gap to show (0.20 vs 0.10)
    result: dict = {"batches": batches, "seeds": seeds, "images_seen": images}
    # every policy starts from statistics re-estimated on canvases (calibrate_bn 4, as the quickstart):
    # claim 1 is about batch statistics during training, the domain shift is claim 3's
    result["claim1"] = [
        finetune(weights, root, p, b, s, images, calibrate=4, quick=quick)
        for p in POLICIES
        for b in batches
        for s in seeds
    ]
    result["claim2"] = claim2(weights, root, args.out)
    result["claim3"] = {
        "region_feature_norm": {
            "classifier statistics": calibrated_scale(weights, root, 0),
            "calibrate_bn 4 batches": calibrated_scale(weights, root, 4),
        },
        "runs": [
            finetune(weights, root, "frozen", 8, s, calibration_images, calibrate=c, quick=quick)
            for c in (0, 4)
            for s in seeds
        ],
    }
    return result


def write_report(result: dict, out: Path) -> str:
    rows = result["claim1"]
    lines = [
        f"## Detection claim 1: val mAP@50 / mAP after {result['images_seen']} training images, mean ± std over "
        f"seeds {list(result['seeds'])}",
        "",
        "| images per device | " + " | ".join(POLICIES) + " |",
        "| ---: |" + " ---: |" * len(POLICIES),
    ]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    for b in result["batches"]:
        cells = []
        for p in POLICIES:
            runs = [r for r in rows if r["policy"] == p and r["batch"] == b]
            cells.append(f"{cell([r['map_50'] for r in runs])} / {cell([r['map'] for r in runs])}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Detection claim 2: 2-process DDP vs one process on the union, trainable weights after 3 steps",
        "",
    ]
    lines += ["| BN policy | max abs difference | largest weight update |", "| --- | ---: | ---: |"]
    lines += [f"| {r['policy']} | {r['max_abs_diff']:.3g} | {r['max_abs_update']:.3g} |" for r in result["claim2"]]
    c3 = result["claim3"]
    lines += ["", "## Detection claim 3: the classifier's statistics on canvases vs calibrate_bn", ""]
    images = c3["runs"][0]["images"]
    lines += [f"| statistics | median region-feature norm | val mAP@50 / mAP (batch 8, {images} images) |"]
    lines += ["| --- | ---: | ---: |"]
    for calibrate, name in ((0, "classifier statistics"), (4, "calibrate_bn 4 batches")):
        runs = [r for r in c3["runs"] if r["calibrate_bn"] == calibrate]
        scores = f"{cell([r['map_50'] for r in runs])} / {cell([r['map'] for r in runs])}"
        lines.append(f"| {name} | {c3['region_feature_norm'][name]:.3g} | {scores} |")
    text = "\n".join(lines) + "\n"
    (out / "detection.md").write_text(text)
    (out / "detection.json").write_text(json.dumps(result, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for p in POLICIES:
            means, stds = [], []
            for b in result["batches"]:
                values = [r["map_50"] for r in rows if r["policy"] == p and r["batch"] == b]
                means.append(statistics.mean(values))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(result["batches"], means, yerr=stds, marker="o", capsize=3, label=f"norm={p}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["batches"], [str(b) for b in result["batches"]])
        ax.set_xlabel("images per device per step")
        ax.set_ylabel(f"val mAP@50 after {result['images_seen']} images")
        ax.set_title("Fine-tuning a C4 detector (ResNet-18, digits on canvases)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "detection.png", dpi=120)
    except ImportError:
        pass
    return text
