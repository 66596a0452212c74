"""ImageDataModule: labelled images to normalised batches, whatever holds them (folders, chunks, your own source).

A classification data module is a source of samples plus this: the ImageNet-style transforms, the
decoder of ``decode_device`` (:mod:`lightning_frozenbn.data.decoders`) and the on-device
normalisation. :class:`~lightning_frozenbn.data.folder.ImageFolderDataModule` and
:class:`~lightning_frozenbn.data.streaming.StreamingImageDataModule` differ only in their source.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_frozenbn.data.contract import SPLIT_STAGE, STAGE_SPLITS, LabelledDataModule, check_loader_settings
from lightning_frozenbn.data.decoders import (
    DecodeDevice,
    Decoder,
    Decoding,
    ImageSettings,
    check_decode_choice,
    decoder_for,
    worker_transform,
)
from lightning_frozenbn.data.image_files import UnlabelledImages
from lightning_frozenbn.errors import DataError

__all__ = ["ImageDataModule"]


class ImageDataModule(LabelledDataModule):
    """Labelled images from a source the subclass opens, decoded and normalised as the weights expect.

    Subclasses implement :meth:`open_split` (and :attr:`classes`); they may replace :meth:`make_loader`
    (a streaming source brings its own loader). Everything else is shared: argument checks, the
    transforms (random-resized crop and flip to train; resize and centre crop to evaluate), the decoder
    chosen at setup, normalisation on the device in the model's memory layout, ``predict_root``.

    Args:
        image_size: crop size fed to the network.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes (persistent when > 0).
        min_scale: smallest crop area fraction of RandomResizedCrop.
        hflip: random horizontal flips for training (off for data where left/right matters, e.g. digits).
        pin_memory: pin host memory; None = when CUDA is available.
        predict_split: the split ``predict`` runs on.
        augment: random crops/flips for training; off = the eval transform (exactly reproducible runs).
        seed: seed of the per-epoch shuffle order (see :class:`~lightning_frozenbn.data.sampling.EpochShuffleSampler`).
        decode: "tensor" (torchvision.io + uint8 transforms, normalised on the device) or "pil".
        decode_device: a key of :data:`~lightning_frozenbn.data.decoders.DECODERS`: "cpu" (decode on the
            workers), "cuda" (batched nvJPEG decode on the GPU) or "dali" (NVIDIA DALI pipelines).
        predict_root: a folder of new, unlabelled images (searched recursively, no class folders) that
            ``predict`` runs on instead of ``predict_split``.
        eval_resize: the shorter side evaluation images are resized to before the centre crop. Default
            ``round(image_size / 0.875)``; the CLI sets it from a torchvision weight's preset
            (``IMAGENET1K_V2``: 232 for 224), see :func:`lightning_frozenbn.backbone.eval_resize_for`.
        class_names: the class names in label order. Default: the train split's folder names. The CLI
            sets them from the checkpoint given with ``--ckpt_path`` (stored there at fit time), so a
            machine without the training data can still predict with named classes.
    """

    def __init__(
        self,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        min_scale: float = 0.08,
        hflip: bool = True,
        pin_memory: bool | None = None,
        predict_split: str = "val",
        augment: bool = True,
        seed: int = 0,
        decode: Decoder = "tensor",
        decode_device: DecodeDevice = "cpu",
        predict_root: str | Path | None = None,
        class_names: list[str] | None = None,
        eval_resize: int | None = None,
    ) -> None:
        super().__init__()
        if eval_resize is not None and (isinstance(eval_resize, bool) or not isinstance(eval_resize, int)):
            raise DataError(f"eval_resize={eval_resize!r} is invalid: expected an integer >= image_size, or null.")
        if class_names is not None and (len(set(class_names)) != len(class_names) or len(class_names) < 2):
            raise DataError(
                f"class_names={class_names!r} is invalid: expected at least two distinct names, in label order."
            )
        check_decode_choice(decode, decode_device)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise DataError(f"image_size={image_size!r} is invalid: expected an integer >= 8 (e.g. 224).")
        check_loader_settings(batch_size, num_workers)
        if not 0 < min_scale <= 1:
            raise DataError(f"min_scale={min_scale!r} is invalid: expected a fraction in (0, 1].")
        if eval_resize is not None and eval_resize < image_size:
            raise DataError(
                f"eval_resize={eval_resize} is smaller than image_size={image_size}: the centre crop would not fit."
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_scale = min_scale
        self.hflip = hflip
        self.predict_split = predict_split
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augment = augment
        self.seed = seed
        self.decode = decode
        self.decode_device = decode_device
        self.eval_resize = round(image_size / 0.875) if eval_resize is None else eval_resize
        self.predict_root = None if predict_root is None else Path(predict_root)
        self.class_names = None if class_names is None else list(class_names)
        self.datasets: dict[str, Dataset] = {}
        self._decoder: type[Decoding] | None = None  # decided at the first use, when the trainer's device is known
        self._decoding: Decoding | None = None

    # ---- what a source provides ---------------------------------------------------------------
    @abstractmethod
    def open_split(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split`` (checked), its items made by ``self.decoding.reader(train)``."""

    def make_loader(self, split: str, dataset: Dataset, shuffle: bool) -> Any:
        """The loader of a split: the decoder's (``shuffle``: training order, last partial batch dropped)."""
        return self.decoding.loader(dataset, shuffle, self.trainer, self._channels_last(), predict=split == "predict")

    # ---- shared --------------------------------------------------------------------------------
    @property
    def settings(self) -> ImageSettings:
        """The transform's and loader's parameters, as the decoders take them."""
        return ImageSettings(
            self.image_size,
            self.eval_resize,
            self.min_scale,
            self.hflip,
            self.augment,
            self.decode,
            self.batch_size,
            self.num_workers,
            self.pin_memory,
            self.seed,
        )

    @property
    def decoding(self) -> Decoding:
        """The decoder of ``decode_device`` on this run's device (chosen once, at the first use), current settings."""
        if self._decoder is None:
            self._decoder = decoder_for(self.decode_device, self.trainer)
        settings = self.settings
        if self._decoding is None or self._decoding.settings != settings:
            self._decoding = self._decoder(settings)
        return self._decoding

    def _transform(self, train: bool) -> Any:
        return worker_transform(self.settings, train)

    def normalize(self, x: Tensor, channels_last: bool = False) -> Tensor:
        """Float, ImageNet-normalised batch from a uint8 one (float batches are returned unchanged)."""
        return self.decoding.normalize(x, channels_last)

    def _channels_last(self) -> bool:
        # lay the batch out as the model's first convolution is laid out (any model, not only ours)
        model = self.trainer.lightning_module if self.trainer is not None else None
        weight = next((p for p in model.parameters() if p.dim() == 4), None) if model is not None else None
        return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[-1] > 1

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The decoder finishes its batches on ``device`` (nvJPEG decodes there); anything else is moved."""
        finished = self.decoding.to_device(batch, device, self._channels_last())
        return super().transfer_batch_to_device(batch, device, dataloader_idx) if finished is None else finished

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Convert uint8 images to normalised float on the device (the workers send uint8)."""
        images = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if isinstance(images, Tensor) and images.dtype == torch.uint8:
            return [self.normalize(batch[0], self._channels_last()), *batch[1:]]
        return batch

    def setup(self, stage: str) -> None:
        """Open the splits this stage needs (checked for layout and class agreement)."""
        for split in STAGE_SPLITS.get(stage, ()):
            self.datasets[split] = self.open_split(split, train=split == "train")
        if stage == "predict":
            if self.predict_root is None:
                self.datasets["predict"] = self.open_split(self.predict_split, train=False)
            else:
                self.datasets["predict"] = self._unlabelled(self.predict_root)

    def _unlabelled(self, root: Path) -> UnlabelledImages:
        classes = self.classes  # the label set must be known before the model writes names
        return UnlabelledImages(root, *self.decoding.reader(train=False), classes=classes)

    def prediction_names(self) -> list[str] | None:
        """Each predicted sample's file, in the predict loader's order."""
        samples = getattr(self.datasets.get("predict"), "samples", None)
        return None if samples is None else [str(sample[0]) for sample in samples]

    def _loader(self, split: str, shuffle: bool) -> Any:
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        return self.make_loader(split, self.datasets[split], shuffle)

    def train_dataloader(self) -> Any:
        """Shuffled training batches (last partial batch dropped)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        """Validation batches, in the split's order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> Any:
        """Test batches, in the split's order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> Any:
        """Batches of ``predict_root`` or ``predict_split``, in order (the prediction writer relies on it)."""
        return self._loader("predict", shuffle=False)
