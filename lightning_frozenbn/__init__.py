"""lightning_frozenbn: fine-tune torchvision ResNets with frozen BatchNorm, verifiably and fast."""

from lightning_frozenbn.backbone import ARCHS, NORMS, ResNetBackbone, ResNetHead, build_resnet
from lightning_frozenbn.checkpoint import AtomicCheckpointIO, ResumableCheckpoint
from lightning_frozenbn.classifier import FrozenBNClassifier
from lightning_frozenbn.data import (
    CocoDetectionDataModule,
    DigitsDataModule,
    DigitsDetectionDataModule,
    ImageFolderDataModule,
    LabelledDataModule,
    StreamingCocoDataModule,
    StreamingImageDataModule,
)
from lightning_frozenbn.detection import FrozenBNDetector, FrozenBNFPNDetector
from lightning_frozenbn.ema import FrozenEMA
from lightning_frozenbn.epilogue import fuse_epilogues
from lightning_frozenbn.errors import (
    CheckpointError,
    DataError,
    FrozenStateViolation,
    GuardConfigError,
    InputError,
    WeightsDownloadError,
    WeightsMismatchError,
)
from lightning_frozenbn.fold import (
    FoldedConv2d,
    FoldedFrozenBatchNorm2d,
    FoldedFrozenBatchNormAct2d,
    fold_frozen_batchnorm,
    unfold_frozen_batchnorm,
)
from lightning_frozenbn.guard import FrozenModuleGuard, eval_subtrees, find_frozen_modules, is_frozen_norm
from lightning_frozenbn.loggers import RunCSVLogger, RunTensorBoardLogger
from lightning_frozenbn.module import FrozenBNModule
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d, calibrate_bn, convert_frozen_batchnorm, to_batchnorm
from lightning_frozenbn.parser import ConciseErrorsParser
from lightning_frozenbn.version import __version__ as __version__
from lightning_frozenbn.writers import CocoResultsWriter, PredictionWriter

__all__ = [
    "ARCHS",
    "NORMS",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CocoDetectionDataModule",
    "CocoResultsWriter",
    "ConciseErrorsParser",
    "DataError",
    "DigitsDataModule",
    "DigitsDetectionDataModule",
    "FoldedConv2d",
    "FoldedFrozenBatchNorm2d",
    "FoldedFrozenBatchNormAct2d",
    "FrozenBNClassifier",
    "FrozenBNDetector",
    "FrozenBNFPNDetector",
    "FrozenBNModule",
    "FrozenEMA",
    "FrozenModuleGuard",
    "FrozenStateViolation",
    "GuardConfigError",
    "ImageFolderDataModule",
    "InputError",
    "LabelledDataModule",
    "PredictionWriter",
    "ResNetBackbone",
    "ResNetHead",
    "ResumableCheckpoint",
    "RunCSVLogger",
    "RunTensorBoardLogger",
    "StatsFrozenBatchNorm2d",
    "StreamingCocoDataModule",
    "StreamingImageDataModule",
    "WeightsDownloadError",
    "WeightsMismatchError",
    "build_resnet",
    "calibrate_bn",
    "convert_frozen_batchnorm",
    "eval_subtrees",
    "find_frozen_modules",
    "fold_frozen_batchnorm",
    "fuse_epilogues",
    "is_frozen_norm",
    "to_batchnorm",
    "unfold_frozen_batchnorm",
]
