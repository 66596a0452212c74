"""Streaming data modules: litdata chunks (local or ``s3://``) sharded over ranks and nodes, resumable mid-epoch."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_frozenbn.chunks import Location, check_chunks, read_manifest, require_litdata
from lightning_frozenbn.coco import CocoDetectionDataModule, check_listed_size, collate_detection
from lightning_frozenbn.data import Decoder, ImageFolderDataModule
from lightning_frozenbn.decode import _decode_bytes
from lightning_frozenbn.errors import DataError

__all__ = ["StreamingCocoDataModule", "StreamingImageDataModule"]

_STAGE_SPLITS = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}


def _epoch_loader_class() -> type:
    from litdata import StreamingDataLoader

    class EpochLoader(StreamingDataLoader):
        """litdata's StreamingDataLoader whose resumed epoch ends when its last batch is handed out.

        Why: after ``load_state_dict`` litdata replays from the saved position until its generator is
        exhausted, but Lightning stops iterating once it has the epoch's last batch; the flag stays set
        and the *next* epoch replays the finished one's (empty) remainder: a mid-epoch resume loses a
        whole epoch without a message (litdata 0.2.76 with Lightning 2.6; tests/test_streaming.py). Here
        an iteration that reached the epoch's end clears the flag before the next one starts.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._start, self._epoch_done = 0, False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._start, self._epoch_done = int(obj.get("num_samples_yielded", 0)) // int(self.batch_size or 1), False

        def __iter__(self) -> Any:
            if self._epoch_done:
                self.restore, self._start = False, 0
            self._epoch_done = False
            total = len(self)
            for position, batch in enumerate(super().__iter__(), start=self._start + 1):
                self._epoch_done = position >= total
                yield batch
            self._start = 0

    return EpochLoader


def _make_loader(dataset: Any, **kwargs: Any) -> Any:
    return _epoch_loader_class()(dataset, **kwargs)


def _check_predict_root(predict_root: Path | None) -> None:
    if predict_root is None:
        raise DataError(
            "predict reads a folder of images (`data.init_args.predict_root`), not streamed chunks: the prediction "
            "writers name each file, and a stream has no files. Set predict_root, or predict with the folder module."
        )


def _decode(data: bytes, name: str, pil: bool) -> Any:
    """The stored file's bytes decoded exactly as the folder path decodes the file."""
    if pil:
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except OSError as err:
            raise DataError(
                f"Cannot decode streamed image {name!r}: {err}. Rewrite the chunks from good files."
            ) from err
    return _decode_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), name)


def _dataset_class() -> type:
    from litdata import StreamingDataset

    class Samples(StreamingDataset):
        """A chunked split; each item goes through ``convert(item)``."""

        def __init__(self, input_dir: str, convert: Any, cache_dir: str | None, **kwargs: Any) -> None:
            super().__init__(input_dir=input_dir, cache_dir=cache_dir, **kwargs)
            self.convert = convert

        def __getitem__(self, index: Any) -> Any:
            return self.convert(super().__getitem__(index))

    return Samples


class _ImageItem:
    """A classification item as the folder path gives it, plus the sample's index in its split."""

    def __init__(self, transform: Any, pil: bool) -> None:
        self.transform, self.pil = transform, pil

    def __call__(self, item: dict[str, Any]) -> tuple[Any, int, int]:
        image = self.transform(_decode(item["image"], item["name"], self.pil))
        return image, int(item["label"]), int(item["index"])


class _Streams:
    """What both streaming modules share: the chunk folder, its manifest, the cache, the per-split datasets."""

    def _init_streams(self, root: str, task: str, cache_dir: str | None, max_cache_size: str) -> None:
        require_litdata()
        self.location, self.task = Location(str(root)), task
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self._manifest: dict[str, Any] | None = None
        self._train_loader: Any = None
        self._resume_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (litdata's state), saved in every checkpoint with the data module.

        Why here as well as in the fit loop's state: Lightning restores the loop's copy only when it
        builds the training loader after the checkpoint is read, but a module that asks for
        ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (any per-step schedule, ours
        included) makes Lightning build the loader before that, and the loop's copy is then never applied:
        the resumed epoch starts over (Lightning 2.6). The data module's state is read first.
        """
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next training loader."""
        self._resume_state = state_dict.get("train_loader")

    def _loader_args(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers, "pin_memory": self.pin_memory}

    def _train_stream(self, dataset: Any, **kwargs: Any) -> Any:
        loader = _make_loader(dataset, drop_last=True, **self._loader_args(), **kwargs)
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    def _calibration_stream(self, train: Any, **kwargs: Any) -> Any:
        """A new stream of the training split with the training items, for ``calibrate_bn`` alone.

        Why: the training stream's position is what a checkpoint saves for an exact mid-epoch resume.
        Calibrating from it (the module read ``train_dataloader()``) moved litdata's counters, so the
        saved position was off by the calibration's batches and a resumed epoch had a step too many.
        """
        fresh = self._split_dataset("train", train.convert, True, self.seed)
        return _make_loader(fresh, drop_last=True, **self._loader_args(), **kwargs)

    @property
    def manifest(self) -> dict[str, Any]:
        """The chunk folder's manifest (read once, checked for format, version and task)."""
        if self._manifest is None:
            manifest = read_manifest(self.location)
            if manifest.get("task") != self.task:
                raise DataError(
                    f"{self.location.url!r} holds {manifest.get('task')} chunks, not {self.task}: point "
                    f"`data.init_args.root` at chunks written from a {self.task} data module."
                )
            self._manifest = manifest
        return self._manifest

    def _split_dataset(self, split: str, convert: Any, train: bool, seed: int) -> Any:
        if split not in self.manifest["splits"]:
            raise DataError(
                f"{self.location.url!r} has no {split!r} split (it has {sorted(self.manifest['splits'])}): "
                f"write it with `lightning-frozenbn-optimize --splits [..., {split}]`."
            )
        check_chunks(self.location, split)  # a missing or truncated chunk: one line now, not a loader timeout later
        cache = None if self.cache_dir is None else str(Path(self.cache_dir) / split)
        return _dataset_class()(
            self.location.join(split),
            convert,
            cache,
            shuffle=train,
            drop_last=train,
            seed=seed,
            max_cache_size=self.max_cache_size,
        )


class StreamingImageDataModule(_Streams, ImageFolderDataModule):
    """:class:`ImageFolderDataModule` read from litdata chunks: a folder or ``s3://`` bucket, streamed to every rank.

    Write the chunks once with ``lightning-frozenbn-optimize`` (the image files' bytes untouched, the
    class names in the manifest); then point ``root`` at them. Everything else is the folder module's:
    the same decode (``decode``), transforms, on-device normalisation, ``num_classes`` and class names
    (linked to the model, stored in checkpoints), ``predict_root``. litdata shards the samples over
    ranks, nodes and workers (no DistributedSampler), shuffles anew each epoch from ``seed``, and keeps
    downloaded chunks of a remote store in ``cache_dir`` up to ``max_cache_size``. The training loader has
    a ``state_dict`` that Lightning saves in every checkpoint: ``fit --ckpt_path`` resumes mid-epoch with
    the samples the interrupted run had not seen yet.

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
        other arguments: as :class:`ImageFolderDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        min_scale: float | None = None,
        hflip: bool | None = None,
        pin_memory: bool | None = None,
        predict_split: str = "val",
        augment: bool = True,
        seed: int = 0,
        decode: Decoder = "tensor",
        decode_device: Literal["cpu"] = "cpu",
        predict_root: str | Path | None = None,
        class_names: list[str] | None = None,
        eval_resize: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        if decode_device != "cpu":
            raise DataError(
                f"decode_device={decode_device!r} is not available for streamed chunks: they are decoded on the "
                "DataLoader workers ('cpu'). Use ImageFolderDataModule for GPU decoding of files."
            )
        super().__init__(
            root, image_size, batch_size, num_workers, 0.08 if min_scale is None else min_scale,
            True if hflip is None else hflip, pin_memory, predict_split, augment, seed, decode, "cpu", predict_root,
            class_names, eval_resize,
        )  # fmt: skip
        self._init_streams(str(root), "classification", cache_dir, max_cache_size)
        self._given = {"min_scale": min_scale, "hflip": hflip}

    @property
    def classes(self) -> list[str]:
        """Class names in label order: ``class_names`` when given, else the manifest's."""
        return self.class_names if self.class_names is not None else list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        """Number of classes (linked into the model by the CLI)."""
        return len(self.classes)

    def setup(self, stage: str) -> None:
        """Open the streamed splits this stage needs (the class names checked against ``class_names``)."""
        for key, value in self._given.items():  # None: as the data module the chunks were written from
            setattr(
                self, key, self.manifest.get("augment", {}).get(key, getattr(self, key)) if value is None else value
            )
        if self.class_names is not None and self.class_names != self.manifest["classes"]:
            raise DataError(
                f"The chunks' classes {self.manifest['classes']} differ from the model's {self.class_names} "
                "(class_names / the checkpoint): point `data.init_args.root` at chunks of the model's classes."
            )
        if stage == "predict":
            _check_predict_root(self.predict_root)
            self.datasets["predict"] = self._unlabelled(self.predict_root)
            return
        for split in _STAGE_SPLITS.get(stage, []):
            convert = _ImageItem(self._transform(split == "train"), self.decode == "pil")
            self.datasets[split] = self._split_dataset(split, convert, split == "train", self.seed)

    def calibration_dataloader(self) -> Any:
        """Training batches for ``calibrate_bn``, from a stream of their own (see :meth:`_calibration_stream`)."""
        if "train" not in self.datasets:
            self.setup("fit")
        return self._calibration_stream(self.datasets["train"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self.datasets[split]
        if split == "predict":
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        if split == "train":
            return self._train_stream(dataset)
        return _make_loader(dataset, drop_last=False, **self._loader_args())


class _CocoItem:
    """A detection item as :class:`CocoDetectionDataModule` gives it, from the stored COCO record."""

    def __init__(self, label_of: dict[int, int], train: bool, hflip: bool, extra_keys: list[str]) -> None:
        self.label_of, self.train, self.extra_keys = label_of, train, extra_keys
        self.flip = v2.RandomHorizontalFlip() if train and hflip else None

    def __call__(self, item: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        record = json.loads(item["record"])
        info, anns = record["image"], record["annotations"]
        image = _decode(item["image"], info["file_name"], pil=False)
        height, width = image.shape[-2:]
        check_listed_size(info["file_name"], info, width, height)  # as the folder module refuses it
        # float32 XYWH -> XYXY, as torchvision's COCO wrapper converts (the same rounding)
        xywh = tv_tensors.BoundingBoxes(
            torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            format="XYWH",
            canvas_size=(height, width),
        )
        boxes = v2.ClampBoundingBoxes()(v2.functional.convert_bounding_box_format(xywh, new_format="XYXY"))
        if self.flip is not None:
            image, boxes = self.flip(tv_tensors.Image(image), boxes)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
        out = {
            "boxes": boxes.as_subclass(Tensor).float(),
            "labels": torch.tensor([self.label_of[int(a["category_id"])] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(int(info["id"])),
        }
        for key in self.extra_keys:
            out[key] = torch.tensor([int(a.get(key, -1)) for a in anns], dtype=torch.int64)
        if self.train:
            keep = crowd == 0
            out = {k: v[keep] if v.dim() and len(v) == len(crowd) else v for k, v in out.items()}
        else:
            out["iscrowd"] = crowd
            out["area"] = torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32)
        return image.as_subclass(Tensor), out


class StreamingCocoDataModule(_Streams, CocoDetectionDataModule):
    """:class:`CocoDetectionDataModule` read from litdata chunks (a folder or ``s3://``), for the detector.

    The chunks hold each image's file bytes and its COCO record (image entry and annotations, checked
    when they were written); the categories are in the manifest. Targets are built as the folder
    module builds them (contiguous labels, crowd boxes left out of training and flagged for evaluation,
    ``extra_keys``). Sharding, per-epoch shuffling, the cache and mid-epoch resume are as in
    :class:`StreamingImageDataModule`.

    Args:
        root: the chunk folder (local path or ``s3://bucket/prefix``).
        cache_dir: where chunks of a remote store are cached (default: litdata's).
        max_cache_size: the cache's size limit.
        hflip: random horizontal flips in training; None = as the data module the chunks were written from.
        other arguments: as :class:`CocoDetectionDataModule`.
    """

    def __init__(
        self,
        root: str,
        predict_split: Literal["val", "test"] = "val",
        batch_size: int = 2,
        num_workers: int = 2,
        hflip: bool | None = None,
        pin_memory: bool | None = None,
        seed: int = 0,
        extra_keys: list[str] | None = None,
        predict_root: str | Path | None = None,
        categories: list[dict[str, Any]] | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__(
            predict_split=predict_split, batch_size=batch_size, num_workers=num_workers, hflip=hflip is not False,
            pin_memory=pin_memory, seed=seed, extra_keys=extra_keys, predict_root=predict_root, categories=categories,
        )  # fmt: skip
        self._init_streams(str(root), "detection", cache_dir, max_cache_size)
        self._given_hflip = hflip

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The model's categories in id order: ``categories`` when given, else the manifest's."""
        if self._categories is not None:
            return self._categories
        return sorted(self.manifest["categories"], key=lambda c: c["id"])

    def setup(self, stage: str) -> None:
        """Open the streamed splits this stage needs (their categories checked against the model's)."""
        if self._given_hflip is None:  # as the data module the chunks were written from
            self.hflip = bool(self.manifest.get("augment", {}).get("hflip", True))
        if stage == "predict":
            _check_predict_root(self.predict_root)
            super().setup(stage)
            return
        theirs = {int(c["id"]): c.get("name") for c in self.manifest["categories"]}
        ours = dict(zip(self.category_ids, self.classes))
        if any(theirs.get(cid, name) != name for cid, name in ours.items()) or set(theirs) - set(ours):
            raise DataError(
                f"The chunks' categories {theirs} differ from the model's {ours}: point `data.init_args.root` at "
                "chunks written with the model's label set."
            )
        missing = sorted(set(self.extra_keys) - set(self.manifest.get("extra_keys", [])))
        if missing:
            raise DataError(f"extra_keys {missing} were not asked for when the chunks were written; rewrite them.")
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        for split in _STAGE_SPLITS.get(stage, []):
            if split not in self._datasets:
                convert = _CocoItem(label_of, split == "train", self.hflip, self.extra_keys)
                self._datasets[split] = self._split_dataset(split, convert, split == "train", self.seed)

    def calibration_dataloader(self) -> Any:
        """Training batches for ``calibrate_bn``, from a stream of their own (see :meth:`_calibration_stream`)."""
        if "train" not in self._datasets:
            self.setup("fit")
        return self._calibration_stream(self._datasets["train"], collate_fn=collate_detection)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self._datasets[split]
        if split == "predict":
            return super()._loader(split, train)
        if train:
            return self._train_stream(dataset, collate_fn=collate_detection)
        return _make_loader(dataset, drop_last=False, collate_fn=collate_detection, **self._loader_args())
