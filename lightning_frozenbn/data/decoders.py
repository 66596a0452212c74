"""One decoder per ``decode_device`` (workers, nvJPEG, DALI): reading, collating, loading, finishing on the device.

Each decoder is one class in :data:`DECODERS`; the ``DecodeDevice`` choice the CLI shows and the values
the data modules accept are that registry's keys, so a new decoder is one class here and cannot be
documented yet refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import v2

from lightning_frozenbn.backbone import IMAGENET_MEAN, IMAGENET_STD
from lightning_frozenbn.data.dali import DaliLoader, DaliTransform, require_dali
from lightning_frozenbn.data.decode import (
    EncodedBatch,
    EncodedLoader,
    collate_encoded,
    decode_batch,
    decode_file,
    decode_stored,
    load_rgb,
    load_rgb_bytes,
    normalize_uint8,
    nvjpeg_available,
)
from lightning_frozenbn.data.sampling import EpochShuffleSampler
from lightning_frozenbn.errors import DataError

__all__ = [
    "DECODERS",
    "DECODE_METHODS",
    "DaliDecoding",
    "DecodeDevice",
    "Decoder",
    "Decoding",
    "ImageSettings",
    "NvjpegDecoding",
    "WorkerDecoding",
    "check_decode_choice",
    "decoder_for",
    "worker_transform",
]

Decoder = Literal["tensor", "pil"]  # how the workers decode: torchvision.io to uint8, or PIL to float
DECODE_METHODS: tuple[str, ...] = get_args(Decoder)


@dataclass(frozen=True)
class ImageSettings:
    """What every decoder needs of the data module: the transform's parameters and the loader's."""

    image_size: int
    eval_resize: int
    min_scale: float
    hflip: bool
    augment: bool
    decode: str
    batch_size: int
    num_workers: int
    pin_memory: bool
    seed: int


def worker_transform(settings: ImageSettings, train: bool) -> T.Compose | v2.Compose:
    """ImageNet-style transforms: random-resized crop (+ flip) to train, resize and centre crop to evaluate."""
    augment = train and settings.augment
    size = settings.image_size
    if settings.decode == "pil":
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if augment:
            flip = [T.RandomHorizontalFlip()] if settings.hflip else []
            return T.Compose([T.RandomResizedCrop(size, scale=(settings.min_scale, 1.0)), *flip, *normalize])
        return T.Compose([T.Resize(settings.eval_resize), T.CenterCrop(size), *normalize])
    # uint8 in, uint8 out: the same sampling as above (v2 draws the same random numbers in the same order)
    if augment:
        flip = [v2.RandomHorizontalFlip()] if settings.hflip else []
        return v2.Compose([v2.RandomResizedCrop(size, scale=(settings.min_scale, 1.0), antialias=True), *flip])
    return v2.Compose([v2.Resize(settings.eval_resize, antialias=True), v2.CenterCrop(size)])


class Decoding:
    """How files become normalised batches on the device, for one ``decode_device``.

    Subclasses set ``name`` (the ``decode_device`` value) and ``help`` (its one-line meaning, in
    messages), and implement the four steps; :func:`decoding_for` picks the class by name.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    reads_files_only: ClassVar[bool] = False  # True: cannot decode bytes handed over from chunks

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        self._mean = torch.tensor(IMAGENET_MEAN)
        self._std = torch.tensor(IMAGENET_STD)

    def reader(self, train: bool) -> tuple[Any, Any]:
        """``(loader, transform)``: how a worker turns a file path into a sample."""
        raise NotImplementedError

    def loader(self, dataset: Dataset, shuffle: bool, trainer: Any, channels_last: bool, predict: bool = False) -> Any:
        """The loader of a split (``shuffle``: the training order, last partial batch dropped).

        ``predict``: the prediction writers map batch indices back to the dataset's samples.
        """
        raise NotImplementedError

    def to_device(self, batch: Any, device: torch.device, channels_last: bool) -> Any | None:
        """The batch moved and finished on ``device``, or None to let Lightning move it as it is."""
        return None

    def normalize(self, x: Tensor, channels_last: bool = False) -> Tensor:
        """Float, ImageNet-normalised batch from a uint8 one (float batches are returned unchanged)."""
        if x.dtype != torch.uint8:
            return x
        return normalize_uint8(x, self._mean, self._std, channels_last)


class WorkerDecoding(Decoding):
    """``cpu``: the DataLoader workers decode (torchvision.io or PIL) and crop; normalised on the device."""

    name = "cpu"
    help = "decode on the DataLoader workers"

    def reader(self, train: bool) -> tuple[Any, Any]:
        """:func:`decode_file` (``decode="tensor"``) or PIL, then the transform."""
        read = load_rgb if self.settings.decode == "pil" else decode_file
        return read, worker_transform(self.settings, train)

    def decode_bytes(self, data: bytes, name: str) -> Any:
        """A stored file's bytes decoded exactly as the file itself would be (for chunks)."""
        if self.settings.decode == "pil":
            return load_rgb_bytes(data, name)
        return decode_stored(data, name)

    def collate_fn(self) -> Any:
        """The collate function of the loaders (None: PyTorch's default)."""
        return None

    def loader(
        self, dataset: Dataset, shuffle: bool, trainer: Any, channels_last: bool, predict: bool = False
    ) -> DataLoader:
        """A DataLoader with :class:`EpochShuffleSampler` for training (the order survives a resume)."""
        s = self.settings
        return DataLoader(
            dataset,
            batch_size=s.batch_size,
            sampler=EpochShuffleSampler(len(dataset), s.seed) if shuffle else None,
            num_workers=s.num_workers,
            pin_memory=s.pin_memory,
            persistent_workers=s.num_workers > 0,
            drop_last=shuffle and len(dataset) > s.batch_size,
            collate_fn=self.collate_fn(),
        )


class NvjpegDecoding(WorkerDecoding):
    """``cuda``: workers read the bytes and plan the crops; nvJPEG decodes each batch on the GPU."""

    name = "cuda"
    help = "batched nvJPEG decode on the GPU"
    reads_files_only = True

    def reader(self, train: bool) -> tuple[Any, Any]:
        """Bytes and a crop plan (:class:`EncodedLoader`); no transform on the worker."""
        s = self.settings
        return EncodedLoader(s.image_size, train and s.augment, s.min_scale, s.hflip, s.eval_resize), None

    def collate_fn(self) -> Any:
        """:func:`collate_encoded`: the bytes stay a list."""
        return collate_encoded

    def to_device(self, batch: Any, device: torch.device, channels_last: bool) -> Any | None:
        """Decode an :class:`EncodedBatch` on ``device``."""
        if not isinstance(batch, EncodedBatch):
            return None
        x = decode_batch(batch, device, self.settings.image_size, self._mean, self._std, channels_last)
        return [x, batch.target.to(device, non_blocking=True)]


class DaliDecoding(Decoding):
    """``dali``: NVIDIA DALI pipelines decode (region-of-interest for training crops), crop and normalise."""

    name = "dali"
    help = "NVIDIA DALI pipelines"
    reads_files_only = True

    def __init__(self, settings: ImageSettings) -> None:
        require_dali()
        super().__init__(settings)

    def reader(self, train: bool) -> tuple[Any, Any]:
        """The workers' reader, for ``predict`` (the prediction writer needs each sample's index)."""
        return WorkerDecoding(self.settings).reader(train)

    def loader(self, dataset: Any, shuffle: bool, trainer: Any, channels_last: bool, predict: bool = False) -> Any:
        """The split's files and labels through a DALI pipeline: on the trainer's GPU, else DALI's CPU backend.

        ``predict`` goes through the workers: the prediction writer needs each sample's index.
        """
        if predict:
            return WorkerDecoding(self.settings).loader(dataset, shuffle, trainer, channels_last)
        s = self.settings
        # outside a Trainer: the GPU if there is one, as decode_device="cuda" does
        device = trainer.strategy.root_device if trainer is not None else torch.device("cuda", 0)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        transform = DaliTransform(
            s.image_size, s.eval_resize, s.min_scale, s.hflip and s.augment, IMAGENET_MEAN, IMAGENET_STD
        )
        return DaliLoader(
            [path for path, _ in dataset.samples],
            [label for _, label in dataset.samples],
            transform,
            train=shuffle,
            augment=shuffle and s.augment,
            batch_size=s.batch_size,
            num_threads=s.num_workers,
            device_id=(device.index or 0) if device.type == "cuda" else None,
            rank=rank,
            world_size=world,
            seed=s.seed,
            channels_last=channels_last,
        )


DECODERS: dict[str, type[Decoding]] = {cls.name: cls for cls in (WorkerDecoding, NvjpegDecoding, DaliDecoding)}
DecodeDevice = Literal[tuple(DECODERS)]  # type: ignore[valid-type]  # the CLI's choice: the registry's names


def decoder_for(decode_device: str, trainer: Any) -> type[Decoding]:
    """The decoder of ``decode_device`` for a run on ``trainer``'s device (a warned fallback where it cannot run).

    ``cuda`` needs a CUDA trainer and a working nvJPEG; without them the workers decode (same images)
    and a warning says why, rather than the run failing on a laptop with a GPU config.
    """
    if decode_device == NvjpegDecoding.name:
        device = trainer.strategy.root_device if trainer is not None else torch.device("cuda")
        reason = "the trainer runs on the CPU" if device.type != "cuda" else nvjpeg_available(device)
        if reason is not None:
            rank_zero_warn(
                f"decode_device='cuda' but {reason}: decoding on the CPU workers instead "
                "(same images; set `data.decode_device: cpu` to silence this)."
            )
            return WorkerDecoding
    return DECODERS[decode_device]


def check_decode_choice(decode: str, decode_device: str) -> None:
    """Refuse an unknown ``decode`` / ``decode_device`` or a contradictory pair, naming the valid values."""
    if decode not in DECODE_METHODS:
        raise DataError(
            f"decode={decode!r} is invalid: expected one of {DECODE_METHODS} ('tensor' = torchvision.io decode "
            "with normalisation on the device, 'pil' = the PIL + ToTensor path)."
        )
    if decode_device not in DECODERS:
        meanings = ", ".join(f"{name!r} = {cls.help}" for name, cls in DECODERS.items())
        raise DataError(f"decode_device={decode_device!r} is invalid: expected one of {tuple(DECODERS)} ({meanings}).")
    if decode == "pil" and decode_device != WorkerDecoding.name:
        raise DataError(
            f"decode='pil' with decode_device={decode_device!r} is contradictory: PIL decodes on the CPU "
            "workers. Use decode='tensor' with it, or decode_device='cpu' to keep PIL."
        )
    if decode_device == DaliDecoding.name:
        require_dali()
