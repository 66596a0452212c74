"""FrozenBNDetector: Faster R-CNN C4 from torchvision's parts around the frozen-BN trunk (the FPN one's base)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD
from lightning_frozenbn.detection.arguments import CHECKED_ARGUMENTS, MAP_BACKENDS, MapBackend, check_arguments
from lightning_frozenbn.metrics import MAP_KEYS, OncePerImageMAP
from lightning_frozenbn.module import FrozenBNModule

__all__ = ["MAP_BACKENDS", "FrozenBNDetector"]


def pad_thin(image: Tensor, max_size: int) -> Tensor:
    """Pad an image too thin for ``max_size`` (5000x10 at 256) at its bottom/right; coordinates unchanged.

    Resizing its long side to ``max_size`` would make its short side under a pixel, and torchvision's
    transform fails ("Input and output sizes should be greater than 0") on the whole batch.
    """
    height, width = image.shape[-2:]
    need = math.ceil(2 * max(height, width) / max_size)  # >= 2 px after the resize
    if min(height, width) >= need:
        return image
    return nn.functional.pad(image, (0, max(need - width, 0), 0, max(need - height, 0)))


def unpad(detection: dict[str, Tensor], real: tuple[int, int], padded: tuple[int, int]) -> dict[str, Tensor]:
    """Detections of a :func:`pad_thin` image: boxes found in the padding cut to the image, empty ones dropped."""
    if real == padded:
        return detection
    boxes = box_ops.clip_boxes_to_image(detection["boxes"], real)
    keep = box_ops.remove_small_boxes(boxes, 1e-3)
    return {**{k: v[keep] for k, v in detection.items() if k != "boxes"}, "boxes": boxes[keep]}


class FrozenBNDetector(FrozenBNModule):
    """Faster R-CNN "C4" (Detectron's R50-C4) on the frozen-BN ResNet: the detector the backbone/head split is for.

    Assembled from torchvision's detection parts, not re-implemented: ``GeneralizedRCNNTransform``
    (resize to ``min_size``/``max_size``, normalise, batch), a ``RegionProposalNetwork`` on the C4 map
    (stride 16), ``MultiScaleRoIAlign`` pooling each region from C4, the frozen-BN ``layer4`` head run
    once per region as the box head, and a ``FastRCNNPredictor``. With ``fold=False`` it computes exactly
    what ``torchvision.models.detection.FasterRCNN`` built from the same parts computes (tested).

    The region head is where the time goes: ``layer4`` runs on ``box_batch_size_per_image`` regions per
    image in training and ``rpn_post_nms_top_n_test`` at test time, so ``fold`` (on by default) matters
    most there, and those two counts are the first knobs to turn on small hardware.

    Research code overrides :meth:`forward_box_features` (the per-region embedding), :meth:`roi_losses`
    (e.g. add a re-identification loss on the box features, with the sampled regions' matched ground
    truth) and :meth:`compute_loss` (how the named losses are summed); see docs/detection.md.

    Batches are ``(images, targets)``: lists of ``(3, H, W)`` images (uint8 0..255 or float 0..1, any
    sizes) and of dicts with ``boxes`` (``(K, 4)`` float, xyxy pixels) and ``labels`` (``(K,)`` int64,
    1..num_classes; 0 is background), as :class:`~lightning_frozenbn.CocoDetectionDataModule` yields.

    Args:
        num_classes: number of object classes, background excluded (the CLI links it from the data).
        head_pool: pooling of the per-region layer4 output: "avg" (torchvision, Detectron) or "max"
            (the person-search heads).
        min_size: the shorter image side after resizing; a list picks one at random per image in
            training (multi-scale training, the usual scale jitter) and the last one for evaluation.
        max_size: cap on the longer side after resizing.
        anchor_sizes: anchor sides in pixels of the resized image, one RPN map so one tuple of sizes.
        aspect_ratios: anchor height/width ratios.
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test: proposals kept per image before and after the RPN's NMS.
        rpn_batch_size_per_image: anchors sampled per image for the RPN losses.
        box_batch_size_per_image: regions sampled per image for the box head in training (the cost
            centre: each runs through layer4).
        box_positive_fraction: share of those regions that are foreground (at most).
        roi_output_size: RoIAlign output side on C4; layer4 halves it (14 -> 7, as in Detectron C4).
        roi_sampling_ratio: RoIAlign sampling points per bin (torchvision's 2; 0 = adaptive).
        box_score_thresh, box_nms_thresh, box_detections_per_img: test-time post-processing.
        image_mean, image_std: normalisation of 0..1 images, that of the pretrained weights.
        map_backend: the COCO evaluation backend of torchmetrics' MeanAveragePrecision.
        scheduler_monitor: the metric a ReduceLROnPlateau scheduler watches (here ``val/map``).
        **kwargs: the arguments every task shares (``arch``, ``weights``, ``norm``, ``freeze_at``, ``fold``,
            ``calibrate_bn``, the optimizer and scheduler, ...), documented on
            :class:`~lightning_frozenbn.module.FrozenBNModule`; ``weights`` may also be a classifier
            checkpoint of this package (its backbone and head are loaded, its classifier dropped).
    """

    #: the console command for this kind of model (named when a checkpoint of the other kind is given)
    command: ClassVar[str] = "lightning-frozenbn-detect"
    #: test-time sizes, region counts and thresholds are set per evaluation, e.g. predict with a higher score
    run_settings: ClassVar[frozenset[str]] = FrozenBNModule.run_settings | {
        "min_size",
        "max_size",
        "rpn_pre_nms_top_n_test",
        "rpn_post_nms_top_n_test",
        "box_score_thresh",
        "box_nms_thresh",
        "box_detections_per_img",
        "map_backend",
    }

    def __init__(
        self,
        num_classes: int,
        head_pool: Literal["avg", "max"] = "avg",
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        anchor_sizes: list[int] = (32, 64, 128, 256, 512),
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        roi_output_size: int = 14,
        roi_sampling_ratio: int = 2,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        image_mean: list[float] = IMAGENET_MEAN,
        image_std: list[float] = IMAGENET_STD,
        map_backend: MapBackend = "pycocotools",
        scheduler_monitor: str = "val/map",
        **kwargs: Any,
    ) -> None:
        check_arguments(**{name: value for name, value in locals().items() if name in CHECKED_ARGUMENTS})
        super().__init__(head_pool=head_pool, scheduler_monitor=scheduler_monitor, **kwargs)
        self.transform = self.build_transform()
        self.rpn = self.build_rpn()
        self.roi_heads = RoIHeads(
            self.build_roi_pool(),
            self.build_box_head(),
            self.build_box_predictor(),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
        )
        self.val_map = OncePerImageMAP(box_format="xyxy", iou_type="bbox", backend=map_backend)
        self.test_map = OncePerImageMAP(box_format="xyxy", iou_type="bbox", backend=map_backend)

    # ---- assembly: each part built from the hyperparameters, overridable one by one ----------
    def build_transform(self) -> GeneralizedRCNNTransform:
        """Resize (several ``min_size``: one drawn per training image, the last in evaluation), normalise, batch."""
        hp = self.hparams
        sizes = (hp.min_size,) if isinstance(hp.min_size, int) else tuple(hp.min_size)
        return GeneralizedRCNNTransform(sizes, hp.max_size, list(hp.image_mean), list(hp.image_std))

    def build_anchors(self) -> AnchorGenerator:
        """Anchors on the one C4 map: every size of ``anchor_sizes`` at every aspect ratio."""
        hp = self.hparams
        return AnchorGenerator((tuple(hp.anchor_sizes),), (tuple(hp.aspect_ratios),))

    def feature_channels(self) -> int:
        """Channels of the map(s) the RPN and the RoI pooling read: C4's."""
        return self.backbone.out_channels

    def build_rpn(self) -> RegionProposalNetwork:
        """The region proposal network on :meth:`build_anchors`: the RPN head, sampling and NMS settings."""
        hp = self.hparams
        anchors = self.build_anchors()
        return RegionProposalNetwork(
            anchors,
            RPNHead(self.feature_channels(), anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=hp.rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": hp.rpn_pre_nms_top_n_train, "testing": hp.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": hp.rpn_post_nms_top_n_train, "testing": hp.rpn_post_nms_top_n_test},
            nms_thresh=0.7,
        )

    def build_roi_pool(self) -> nn.Module:
        """RoIAlign of each region from the C4 map (``roi_output_size``, stride 16)."""
        return MultiScaleRoIAlign(["0"], self.hparams.roi_output_size, self.hparams.roi_sampling_ratio)

    def build_box_head(self) -> nn.Module:
        """RoIHeads' box head: a placeholder here, because :meth:`forward_box_features` runs layer4 (``self.head``).

        So layer4 is registered once, under ``head.`` as in the classifier (its weights load either way).
        """
        return nn.Identity()

    def box_embedding_size(self) -> int:
        """The width of :meth:`forward_box_features`' embedding, the box predictor's input."""
        return self.head.out_channels

    def build_box_predictor(self) -> nn.Module:
        """Class scores and box deltas from the box head's embedding, Detectron's initialisation.

        Near-zero scores and deltas at the start: nn.Linear's default gives logits as large as the
        pretrained head's features (tens, on a digits backbone), and the first steps then spend
        themselves undoing them (torchvision starts from COCO weights, never from here).
        """
        predictor = FastRCNNPredictor(self.box_embedding_size(), self.hparams.num_classes + 1)
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias), nn.init.zeros_(predictor.bbox_pred.bias)
        return predictor

    # ---- the parts research code overrides -------------------------------------------------
    def forward_backbone(self, images: Tensor) -> Tensor | dict[str, Tensor]:
        """The C4 feature map of the batched, normalised images (a detector with several maps: them, by name)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def forward_box_features(self, regions: Tensor) -> Tensor:
        """Per-region embedding ``(R, head.out_channels)`` from RoIAligned C4 regions: layer4 + pooling."""
        return self.head(regions)

    def roi_losses(
        self,
        box_features: Tensor,
        class_logits: Tensor,
        box_regression: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
        matched_idxs: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The box-head losses by name; override to add losses on the sampled regions.

        Args:
            box_features: :meth:`forward_box_features` of the sampled regions, images concatenated.
            class_logits: the predictor's class scores for them.
            box_regression: the predictor's box deltas for them.
            labels: per image, each sampled region's class (0 = background).
            regression_targets: per image, the encoded box targets.
            matched_idxs: per image, the index into ``targets[i]["boxes"]`` of each region's
                best-matching ground truth (meaningful where ``labels > 0``).
            targets: the (resized) targets, with any extra per-box keys the data carries.
        """
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def compute_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The training loss from the named losses: their sum (override to weight them)."""
        return torch.stack(list(losses.values())).sum()

    # ---- the pipeline -----------------------------------------------------------------------
    def forward_roi(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Torchvision's ``RoIHeads.forward`` for boxes, with the box head and the losses overridable."""
        roi = self.roi_heads
        if self.training:
            if targets is None:
                raise ValueError("Training needs targets: batches of (images, targets).")
            proposals, matched_idxs, labels, regression_targets = roi.select_training_samples(proposals, targets)
        box_features = self.forward_box_features(roi.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = roi.box_predictor(box_features)
        if self.training:
            losses = self.roi_losses(
                box_features, class_logits, box_regression, labels, regression_targets, matched_idxs, targets
            )
            return [], losses
        boxes, scores, classes = roi.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        return [{"boxes": b, "labels": c, "scores": s} for b, c, s in zip(boxes, classes, scores)], {}

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training mode: the losses by name. Eval mode: per image ``boxes`` (xyxy pixels), ``labels``, ``scores``."""
        images = [img if img.is_floating_point() else img.to(self.dtype).div_(255) for img in images]
        real_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images = [pad_thin(img, self.transform.max_size) for img in images]
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.forward_backbone(batch.tensors)
        features = features if isinstance(features, dict) else OrderedDict([("0", features)])
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.forward_roi(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**roi_losses, **rpn_losses}
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        return [unpad(d, real, padded) for d, real, padded in zip(detections, real_sizes, original_sizes)]

    # ---- Lightning hooks --------------------------------------------------------------------
    def training_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        """Sum the RPN and box-head losses; log each by name; stop at the first non-finite loss."""
        images, targets = batch
        losses = self(images, targets)
        loss = self.compute_loss(losses)
        self.check_loss_finite(loss, batch_idx)
        n = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _eval_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], metric: OncePerImageMAP) -> None:
        images, targets = batch
        metric.update_detections(self(images), targets)

    def _log_map(self, stage: str, metric: OncePerImageMAP) -> None:
        result = metric.compute()  # already reduced over ranks by torchmetrics
        self.log_dict({f"{stage}/{k}": result[k].float() for k in MAP_KEYS if k != "map_50"})
        self.log(f"{stage}/images", result["images"].float())  # distinct images evaluated (DDP repeats dropped)
        self.log(f"{stage}/map_50", result["map_50"].float(), prog_bar=True)
        metric.reset()

    def validation_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> None:
        """Accumulate COCO box mAP on the validation split."""
        self._eval_step(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/map`` (0.5:0.95), ``val/map_50``, ``val/map_75``, by object size, recalls and ``val/images``."""
        self._log_map("val", self.val_map)

    def test_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> None:
        """Accumulate COCO box mAP on the test split."""
        self._eval_step(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        """Log the ``test/`` mAP figures."""
        self._log_map("test", self.test_map)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Detections per image on the CPU, with the ``image_id`` the data gave (for COCO results files)."""
        images, targets = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        detections = self(images)
        out = []
        for i, d in enumerate(detections):
            item: dict[str, Any] = {k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in d.items()}
            if targets is not None and "image_id" in targets[i]:
                item["image_id"] = int(targets[i]["image_id"])
            out.append(item)
        return out
