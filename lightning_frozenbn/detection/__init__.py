"""The detectors: Faster R-CNN C4 and R50-FPN on the frozen-BN trunk, and torchvision's checkpoints mapped onto them."""

from lightning_frozenbn.detection.c4 import MAP_BACKENDS, FrozenBNDetector
from lightning_frozenbn.detection.fpn import FrozenBNFPNDetector

__all__ = ["MAP_BACKENDS", "FrozenBNDetector", "FrozenBNFPNDetector"]
