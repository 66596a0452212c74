"""The data wing: labelled data modules behind one contract, their decoders, and chunks for streaming."""

from lightning_frozenbn.data.chunks import optimize_data
from lightning_frozenbn.data.coco import CocoDetectionDataModule, DetectionDataModule
from lightning_frozenbn.data.contract import ChunkEntry, LabelledDataModule
from lightning_frozenbn.data.decoders import DECODERS, DecodeDevice, Decoder, Decoding
from lightning_frozenbn.data.digits import DigitsDataModule, DigitsDetectionDataModule
from lightning_frozenbn.data.folder import ImageFolderDataModule
from lightning_frozenbn.data.images import ImageDataModule
from lightning_frozenbn.data.sampling import EpochShuffleSampler
from lightning_frozenbn.data.streaming import StreamingCocoDataModule, StreamingImageDataModule

__all__ = [
    "DECODERS",
    "ChunkEntry",
    "CocoDetectionDataModule",
    "DecodeDevice",
    "Decoder",
    "Decoding",
    "DetectionDataModule",
    "DigitsDataModule",
    "DigitsDetectionDataModule",
    "EpochShuffleSampler",
    "ImageDataModule",
    "ImageFolderDataModule",
    "LabelledDataModule",
    "StreamingCocoDataModule",
    "StreamingImageDataModule",
    "optimize_data",
]
