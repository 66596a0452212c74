r"""Where a digits-on-canvas detector loses its mAP: proposals, region classification, feature transfer.

    python scripts/diagnose_detector.py --classifier runs/quickstart/checkpoints/last.ckpt \
        [--detector runs/detection_quickstart/checkpoints/last.ckpt] [--root data/digits_detection]

Prints, on the first validation batches of the digits detection set:
  * with ``--detector``: the RPN's recall at IoU 0.5 (are the digits proposed at all?), the box head's
    accuracy on the ground-truth boxes (can it name a digit it is given?), and the share of digits found
    with the right class at score > 0.5;
  * for the classification checkpoint: its accuracy on square ground-truth crops resized to its 32 px
    input, against the accuracy of its own linear classifier on the detector's RoI features of the same
    boxes (RoIAlign on C4, then its layer4), with and without ``calibrate_bn``: whether the classifier's
    features transfer to regions of a canvas, and the magnitude of those features.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from lightning_frozenbn import DigitsDetectionDataModule, FrozenBNClassifier, FrozenBNDetector, calibrate_bn
from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD


def regions(det, images, boxes):
    batch, _ = det.transform([i.float() / 255 for i in images])
    feats = OrderedDict([("0", det.forward_backbone(batch.tensors))])
    return batch, feats, det.forward_box_features(det.roi_heads.box_roi_pool(feats, boxes, batch.image_sizes))


@torch.no_grad()
def detector_report(det, val):
    found = n_gt = named = hit = 0
    for images, targets in val:
        boxes = [t["boxes"] for t in targets]
        labels = torch.cat([t["labels"] for t in targets])
        batch, feats, features = regions(det, images, boxes)
        proposals, _ = det.rpn(batch, feats)
        for p, g in zip(proposals, boxes):
            found += int((box_iou(g, p).max(1).values >= 0.5).sum())
        logits, _ = det.roi_heads.box_predictor(features)
        named += int((logits.argmax(1) == labels).sum())
        for d, t in zip(det(images), targets):
            keep = d["scores"] > 0.5
            if keep.any():
                ok = (box_iou(t["boxes"], d["boxes"][keep]) >= 0.5) & (t["labels"][:, None] == d["labels"][keep][None])
                hit += int(ok.any(1).sum())
        n_gt += len(labels)
    print(f"RPN recall@0.5: {found / n_gt:.3f}   box head accuracy on GT boxes: {named / n_gt:.3f}   ", end="")
    print(f"digits found with the right class (score > 0.5, IoU >= 0.5): {hit / n_gt:.3f}   ({n_gt} digits)")


@torch.no_grad()
def transfer_report(classifier, val, train, weights, roi_sizes=(2, 4, 7)):
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    ok = n = 0
    for images, targets in val:
        for image, t in zip(images, targets):
            for (x0, y0, x1, y1), label in zip(t["boxes"].int().tolist(), t["labels"].tolist()):
                side, cx, cy = max(x1 - x0, y1 - y0), (x0 + x1) // 2, (y0 + y1) // 2
                crop = image[
                    :, max(0, cy - side // 2) : cy + side // 2 + 1, max(0, cx - side // 2) : cx + side // 2 + 1
                ]
                crop = F.interpolate(crop.float()[None] / 255, size=(32, 32), mode="bilinear")
                ok += int(classifier((crop - mean) / std).argmax(1).item() + 1 == label)
                n += 1
    print(f"classifier on square GT crops resized to 32 px: accuracy {ok / n:.3f}")
    for roi in roi_sizes:
        for calib in (0, 4):
            det = FrozenBNDetector(10, arch=classifier.hparams.arch, weights=weights, min_size=128, roi_output_size=roi)
            det.eval()
            if calib:
                calibrate_bn(det, (b[0] for b in train), calib)
            right = total = 0
            magnitude = []
            for images, targets in val:
                _, _, features = regions(det, images, [t["boxes"] for t in targets])
                labels = torch.cat([t["labels"] for t in targets])
                right += int((classifier.classifier(features).argmax(1) + 1 == labels).sum())
                total += len(labels)
                magnitude.append(features.mean().item())
            print(
                f"classifier's linear layer on the detector's RoI features (RoIAlign {roi}x{roi}, calibrate_bn "
                f"{calib}): accuracy {right / total:.3f}, mean feature {sum(magnitude) / len(magnitude):.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier", required=True, help="a FrozenBNClassifier checkpoint trained on digits")
    parser.add_argument("--detector", help="a FrozenBNDetector checkpoint to diagnose")
    parser.add_argument("--root", default="data/digits_detection")
    parser.add_argument("--batches", type=int, default=8, help="validation batches of 8 canvases")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = DigitsDetectionDataModule(root=args.root, num_workers=0, batch_size=8)
    data.prepare_data()
    data.setup("fit")
    val = [b for _, b in zip(range(args.batches), data.val_dataloader())]
    if args.detector:
        detector_report(FrozenBNDetector.load_from_checkpoint(args.detector, map_location="cpu").eval(), val)
    classifier = FrozenBNClassifier.load_from_checkpoint(args.classifier, map_location="cpu").eval()
    transfer_report(classifier, val, data.train_dataloader(), args.classifier)


if __name__ == "__main__":
    main()
