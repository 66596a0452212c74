"""Streaming data modules: a chunk source (local or ``s3://``) plus the file modules' decoder and targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_frozenbn.data.chunk_source import ChunkSource
from lightning_frozenbn.data.coco import DetectionDataModule, coco_target, collate_detection
from lightning_frozenbn.data.decode import decode_stored
from lightning_frozenbn.data.decoders import WorkerDecoding
from lightning_frozenbn.data.images import ImageDataModule
from lightning_frozenbn.errors import DataError

__all__ = ["StreamingCocoDataModule", "StreamingImageDataModule"]


def _check_predict_root(predict_root: Path | None) -> None:
    if predict_root is None:
        raise DataError(
            "predict reads a folder of images (`data.init_args.predict_root`), not streamed chunks: the prediction "
            "writers name each file, and a stream has no files. Set predict_root, or predict with the folder module."
        )


class _ImageItem:
    """A classification item as the folder path gives it, plus the sample's index in its split."""

    def __init__(self, decoding: WorkerDecoding, transform: Any) -> None:
        self.decoding = decoding
        self.transform = transform

    def __call__(self, item: dict[str, Any]) -> tuple[Any, int, int]:
        image = self.transform(self.decoding.decode_bytes(item["image"], item["name"]))
        return image, int(item["label"]), int(item["index"])


class StreamingImageDataModule(ImageDataModule):
    """Classification from litdata chunks (a folder or ``s3://`` bucket), streamed to every rank.

    Write the chunks once with ``lightning-frozenbn-optimize`` (the image files' bytes untouched, the
    class names in the manifest); then point ``root`` at them. It is the folder module's decoder,
    transforms, on-device normalisation and class names over a :class:`ChunkSource` instead of a folder.
    The training loader's position is saved in every checkpoint: ``fit --ckpt_path`` resumes mid-epoch
    with the samples the interrupted run had not seen yet.

    Batches are ``[image, label, index]``: ``index`` is the sample's position in its split as written,
    for accounting (which samples a step saw).

    Args:
        root: the chunk folder written by ``lightning-frozenbn-optimize`` (local path or ``s3://bucket/prefix``;
            the endpoint and keys come from the environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
        cache_dir: where chunks of a remote store are cached (default: litdata's).
        max_cache_size: the cache's size limit (litdata's notation, e.g. "50GB").
        min_scale, hflip: the training augmentation; None = the settings of the data module the chunks were
            written from (recorded in the manifest), so switching a config to streaming keeps its augmentation.
        decode_device: only "cpu" (the GPU decode paths read files, not chunks).
        **kwargs: the other image settings, documented on :class:`~lightning_frozenbn.data.images.ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        min_scale: float | None = None,
        hflip: bool | None = None,
        decode_device: Literal["cpu"] = "cpu",
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        **kwargs: Any,
    ) -> None:
        if decode_device != WorkerDecoding.name:
            raise DataError(
                f"decode_device={decode_device!r} is not available for streamed chunks: they are decoded on the "
                "DataLoader workers ('cpu'). Use ImageFolderDataModule for GPU decoding of files."
            )
        super().__init__(
            min_scale=0.08 if min_scale is None else min_scale,
            hflip=True if hflip is None else hflip,
            decode_device=WorkerDecoding.name,
            **kwargs,
        )
        loader_args = {"batch_size": self.batch_size, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        self.chunks = ChunkSource(str(root), "classification", cache_dir, max_cache_size, loader_args)
        self._given = {"min_scale": min_scale, "hflip": hflip}

    @property
    def source(self) -> str:
        """The chunk folder."""
        return self.chunks.location.url

    @property
    def classes(self) -> list[str]:
        """Class names in label order: ``class_names`` when given, else the manifest's."""
        return self.class_names if self.class_names is not None else list(self.chunks.manifest["classes"])

    def setup(self, stage: str) -> None:
        """Open the streamed splits this stage needs (the class names checked against ``class_names``)."""
        for key, value in self._given.items():  # None: as the data module the chunks were written from
            setattr(self, key, self.chunks.augment(key, value, getattr(self, key)))
        written = self.chunks.manifest["classes"]
        if self.class_names is not None and self.class_names != written:
            raise DataError(
                f"The chunks' classes {written} differ from the model's {self.class_names} "
                "(class_names / the checkpoint): point `data.init_args.root` at chunks of the model's classes."
            )
        if stage == "predict":
            _check_predict_root(self.predict_root)
        super().setup(stage)

    def open_split(self, split: str, train: bool) -> Dataset:
        """The split's stream; items decoded and transformed as the folder module's files are."""
        convert = _ImageItem(self.decoding, self._transform(train))
        return self.chunks.open(split, convert, train, self.seed)

    def make_loader(self, split: str, dataset: Dataset, shuffle: bool) -> Any:
        """Litdata loaders for the streamed splits (the training one resumable); the workers' for predict_root."""
        if split == "predict":
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        if split == "train":
            return self.chunks.train_stream(dataset)
        return self.chunks.eval_stream(dataset)

    def calibration_dataloader(self) -> Any:
        """Training batches for ``calibrate_bn`` from a stream of their own (``ChunkSource.calibration_stream``)."""
        if "train" not in self.datasets:
            self.setup("fit")
        return self.chunks.calibration_stream(self.datasets["train"], self.seed)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (see ``ChunkSource.state_dict``)."""
        return self.chunks.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next training stream."""
        self.chunks.load_state_dict(state_dict)


class _CocoItem:
    """A detection item as :class:`CocoDetectionDataModule` gives it, from the stored COCO record."""

    def __init__(self, label_of: dict[int, int], train: bool, hflip: bool, extra_keys: list[str]) -> None:
        self.label_of = label_of
        self.train = train
        self.extra_keys = extra_keys
        self.flip = v2.RandomHorizontalFlip() if train and hflip else None

    def __call__(self, item: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        record = json.loads(item["record"])
        name = record["image"]["file_name"]
        image = decode_stored(item["image"], name)
        return coco_target(image, record, self.label_of, self.train, self.flip, self.extra_keys, name)


class StreamingCocoDataModule(DetectionDataModule):
    """Detection from litdata chunks (a folder or ``s3://``): the COCO module's targets over a chunk source.

    The chunks hold each image's file bytes and its COCO record (image entry and annotations, checked
    when they were written); the categories are in the manifest. Targets are built by the same
    function as the folder module's (:func:`~lightning_frozenbn.data.coco.coco_target`). Sharding,
    per-epoch shuffling, the cache and mid-epoch resume are as in :class:`StreamingImageDataModule`.

    Args:
        root: the chunk folder (local path or ``s3://bucket/prefix``).
        cache_dir: where chunks of a remote store are cached (default: litdata's).
        max_cache_size: the cache's size limit.
        hflip: random horizontal flips in training; None = as the data module the chunks were written from.
        **kwargs: the other detection settings, documented on
            :class:`~lightning_frozenbn.data.coco.DetectionDataModule`.
    """

    def __init__(
        self,
        root: str,
        hflip: bool | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        **kwargs: Any,
    ) -> None:
        super().__init__(hflip=hflip is not False, **kwargs)
        loader_args = {"batch_size": self.batch_size, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        self.chunks = ChunkSource(str(root), "detection", cache_dir, max_cache_size, loader_args)
        self._given_hflip = hflip

    @property
    def source(self) -> str:
        """The chunk folder."""
        return self.chunks.location.url

    def source_categories(self) -> list[dict[str, Any]]:
        """The categories recorded in the manifest."""
        return self.chunks.manifest["categories"]

    def setup(self, stage: str) -> None:
        """Open the streamed splits this stage needs (their categories checked against the model's)."""
        self.hflip = bool(self.chunks.augment("hflip", self._given_hflip, True))
        if stage == "predict":
            _check_predict_root(self.predict_root)
        super().setup(stage)

    def open_split(self, split: str, train: bool) -> Dataset:
        """The split's stream, its categories and extra keys checked against the manifest's."""
        fix = "Point `data.init_args.root` at chunks written with the model's label set."
        self.check_categories(self.chunks.manifest["categories"], "chunks'", fix)
        missing = sorted(set(self.extra_keys) - set(self.chunks.manifest.get("extra_keys", [])))
        if missing:
            raise DataError(f"extra_keys {missing} were not asked for when the chunks were written; rewrite them.")
        convert = _CocoItem(self.label_of, train, self.hflip, self.extra_keys)
        return self.chunks.open(split, convert, train, self.seed)

    def make_loader(self, split: str, dataset: Dataset, train: bool) -> Any:
        """Litdata loaders for the streamed splits (the training one resumable); the workers' for predict_root."""
        if split == "predict":
            return super().make_loader(split, dataset, train)
        if train:
            return self.chunks.train_stream(dataset, collate_fn=collate_detection)
        return self.chunks.eval_stream(dataset, collate_fn=collate_detection)

    def calibration_dataloader(self) -> Any:
        """Training batches for ``calibrate_bn`` from a stream of their own (``ChunkSource.calibration_stream``)."""
        if "train" not in self.datasets:
            self.setup("fit")
        return self.chunks.calibration_stream(self.datasets["train"], self.seed, collate_fn=collate_detection)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (see ``ChunkSource.state_dict``)."""
        return self.chunks.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next training stream."""
        self.chunks.load_state_dict(state_dict)
