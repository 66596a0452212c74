"""Section "fpn": the R50-FPN training step, ours (frozen BN folded) vs torchvision's as its COCO weights build it."""

from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from bench.detection import COLUMNS, detection_section
from bench.table import fmt_table


def torchvision_fpn(arch, num_classes, **kwargs):
    """``fasterrcnn_resnet50_fpn(weights=COCO_V1)``'s build: FrozenBatchNorm2d (eps 0), 3 trainable layers."""
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    model = FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = 0.0
    return model


def fpn_variants(args):
    """(name, model): ours folded, ours unfolded (the same modules without the fold), torchvision's; same weights."""
    from lightning_frozenbn import FrozenBNFPNDetector
    from lightning_frozenbn.detection.torchvision_weights import to_our_keys

    common = dict(min_size=args.det_size, max_size=args.det_size * 2, box_batch_size_per_image=args.det_regions)
    torch.manual_seed(0)
    theirs = torchvision_fpn(args.arch, args.det_classes + 1, **common)
    state = to_our_keys(theirs.state_dict())
    ours = FrozenBNFPNDetector(args.det_classes, arch=args.arch, fold=True, bn_eps=0.0, **common)
    unfolded = FrozenBNFPNDetector(args.det_classes, arch=args.arch, fold=False, bn_eps=0.0, **common)
    for model in (ours, unfolded):
        model.load_state_dict(state)
    return [
        ("ours FPN (folded)", ours),
        ("ours FPN, fold off", unfolded),
        ("torchvision fasterrcnn_resnet50_fpn (COCO_V1 build)", theirs),
    ]


def run(ctx):
    return detection_section(ctx.args, ctx.device, fpn_variants)


def report(ctx, rows):
    a = ctx.args
    return (
        f"## Faster R-CNN R50-FPN training step: {a.arch}, batch {a.det_batch}, {a.det_size} px, {a.det_regions} "
        "regions/image, stem+layer1 frozen (trainable_backbone_layers=3), frozen BN everywhere, same weights; "
        "ours_*_over_this < 1: ours is faster / saves less\n" + fmt_table(rows, COLUMNS)
    )
