"""FrozenBNFPNDetector: Faster R-CNN R50-FPN (torchvision's ``fasterrcnn_resnet50_fpn``) on the frozen, folded trunk."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.backbone import Norm, build_resnet
from lightning_frozenbn.detection.c4 import FrozenBNDetector
from lightning_frozenbn.detection.torchvision_weights import (
    TORCHVISION_FPN_EPS,
    is_detection_weights,
    load_detector_state,
    read_detection_weights,
    to_our_keys,
)
from lightning_frozenbn.epilogue import fuse_epilogues
from lightning_frozenbn.fold import fold_frozen_batchnorm

__all__ = ["FrozenBNFPNDetector"]

_LEVELS = ("0", "1", "2", "3")  # C2..C5 into the FPN; it adds "pool" (LastLevelMaxPool): five maps


class FrozenBNFPNDetector(FrozenBNDetector):
    """Faster R-CNN with a feature pyramid: the detector most fine-tuning starts from, on this package's trunk.

    torchvision's ``fasterrcnn_resnet50_fpn`` assembled around the frozen-BN ResNet of
    :func:`~lightning_frozenbn.backbone.build_resnet`: ``FeaturePyramidNetwork`` over C2..C5 with
    ``LastLevelMaxPool`` (five maps), an RPN with one anchor size per map, ``MultiScaleRoIAlign`` over
    C2..C5 (7x7), the two-layer MLP box head and a ``FastRCNNPredictor``. Module names follow torchvision's
    except the trunk's (``backbone.body.layer4`` is ``head.layer4`` here, as in the classifier), and the
    weights loader maps them, so torchvision's checkpoints load exactly: the same detections as torchvision's
    model from the same file (tests/detection/test_fpn.py). ``freeze_at`` is detectron2's and maps to
    torchvision's ``trainable_backbone_layers = 5 - freeze_at`` (default 2: layer2..layer4 train).
    Training, evaluation, prediction, the override points and the data are the C4 detector's
    (:class:`~lightning_frozenbn.FrozenBNDetector`); the fold, the guard, streaming and exact resume cover it alike.

    Args:
        num_classes: object classes, background excluded. Other than a checkpoint's (COCO: 90 + background),
            only the box predictor is new, as in torchvision's fine-tuning tutorial (one line says so).
        weights: ``None``; a torchvision ImageNet name or classifier file for the trunk alone (as for the C4
            detector); torchvision's detector weights by name (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``,
            downloaded as torchvision does) or a local file of that model's ``state_dict``.
        bn_eps: the frozen BN's eps. None: what the weights were trained with (0.0 for torchvision's
            FPN detector weights, as torchvision sets it; else FrozenBatchNorm2d's 1e-5). The value used is
            recorded in the hyperparameters, so a checkpoint of a fine-tune rebuilds with it.
        fpn_channels: channels of every pyramid map (torchvision: 256).
        representation_size: width of the MLP box head (torchvision: 1024).
        roi_output_size: RoIAlign output side on each level (torchvision: 7).
        anchor_sizes: one anchor size per pyramid map, five (torchvision: 32, 64, 128, 256, 512).
        **kwargs: the :class:`~lightning_frozenbn.FrozenBNDetector` arguments (``head_pool`` does not apply).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "resnet50",
        weights: str | None = None,
        bn_eps: float | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        roi_output_size: int = 7,
        anchor_sizes: list[int] = (32, 64, 128, 256, 512),
        **kwargs: Any,
    ) -> None:
        if len(list(anchor_sizes)) != 5:
            raise ValueError(
                f"anchor_sizes={list(anchor_sizes)!r}: the FPN detector has five maps, one anchor size each "
                "(e.g. [32, 64, 128, 256, 512])."
            )
        for name, value in (("fpn_channels", fpn_channels), ("representation_size", representation_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer.")
        self._detection_weights = weights if is_detection_weights(weights) else None
        super().__init__(
            num_classes,
            arch=arch,
            weights=weights,
            roi_output_size=roi_output_size,
            anchor_sizes=anchor_sizes,
            **kwargs,
        )
        feature_channels = [self.backbone.out_channels // 4, self.backbone.out_channels // 2]
        feature_channels += [self.backbone.out_channels, self.head.out_channels]
        self.fpn = FeaturePyramidNetwork(feature_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        eps = bn_eps
        if self._detection_weights is not None:
            state, source = read_detection_weights(self._detection_weights)
            replaced = load_detector_state(self, to_our_keys(state), source)
            eps = TORCHVISION_FPN_EPS if bn_eps is None else bn_eps
            if replaced:
                rank_zero_info(
                    f"FrozenBNFPNDetector: {source} has another number of classes than num_classes={num_classes}: "
                    "its box predictor is left out and a new one trains (the rest of the detector is loaded)."
                )
        if eps is not None:
            for module in self.modules():
                if isinstance(module, FrozenBatchNorm2d):
                    module.eps = eps
        self.hparams["bn_eps"] = eps  # the value used: a checkpoint rebuilds with it (weights are None there)
        if self.hparams.fold:  # after the weights and eps are final: the folded convolutions read both
            for part in (self.backbone, self.head):
                fold_frozen_batchnorm(part)
                if self.hparams.fused_epilogue:
                    fuse_epilogues(part)

    def build_trunk(
        self,
        arch: str,
        weights: str | None,
        norm: Norm,
        freeze_at: int,
        fold: bool,
        head_pool: Literal["avg", "max"],
        fused_epilogue: bool,
    ) -> tuple[nn.Module, nn.Module]:
        """The trunk unfolded (folded once the weights and eps are final); a detector checkpoint loads later."""
        trunk_weights = None if self._detection_weights is not None else weights
        return build_resnet(arch, trunk_weights, norm, freeze_at, False, head_pool, False)

    def build_anchors(self) -> AnchorGenerator:
        """One anchor size per pyramid map (torchvision's ``_default_anchorgen``), every aspect ratio on each."""
        hp = self.hparams
        return AnchorGenerator(tuple((s,) for s in hp.anchor_sizes), (tuple(hp.aspect_ratios),) * 5)

    def feature_channels(self) -> int:
        """Channels of every pyramid map."""
        return self.hparams.fpn_channels

    def build_roi_pool(self) -> nn.Module:
        """RoIAlign of each region from its level of C2..C5 (``roi_output_size``, torchvision's level mapping)."""
        return MultiScaleRoIAlign(list(_LEVELS), self.hparams.roi_output_size, self.hparams.roi_sampling_ratio)

    def build_box_head(self) -> nn.Module:
        """Torchvision's two-layer MLP (``fc6``, ``fc7``) on the flattened RoIAligned regions."""
        hp = self.hparams
        return TwoMLPHead(hp.fpn_channels * hp.roi_output_size**2, hp.representation_size)

    def box_embedding_size(self) -> int:
        """The MLP head's width."""
        return self.hparams.representation_size

    def forward_backbone(self, images: Tensor) -> dict[str, Tensor]:
        """The pyramid: C2..C5 of the trunk through the FPN, five maps by name."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        stages = self.backbone.forward_stages(images)
        return self.fpn(OrderedDict(zip(_LEVELS, [*stages, self.head.layer4(stages[-1])])))

    def forward_box_features(self, regions: Tensor) -> Tensor:
        """Per-region embedding ``(R, representation_size)``: the MLP box head."""
        return self.roi_heads.box_head(regions)
