"""COCO-format detection data: one target builder, one category check, and the data modules built on them."""

from __future__ import annotations

import contextlib
import io
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_frozenbn.data.annotations import check_categories, read_annotations
from lightning_frozenbn.data.contract import (
    SPLIT_STAGE,
    STAGE_SPLITS,
    ChunkEntry,
    LabelledDataModule,
    check_loader_settings,
)
from lightning_frozenbn.data.decode import decode_file
from lightning_frozenbn.data.folder import check_header
from lightning_frozenbn.data.image_files import UnlabelledImages
from lightning_frozenbn.data.sampling import EpochShuffleSampler
from lightning_frozenbn.errors import DataError

__all__ = [
    "CocoDetectionDataModule",
    "DetectionDataModule",
    "check_listed_size",
    "check_same_categories",
    "coco_target",
    "collate_detection",
]

Split = Literal["train", "val", "test"]


def collate_detection(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images of any sizes stay a list (the detector's transform batches them): ``(images, targets)``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def check_listed_size(file: str, info: dict[str, Any], width: int, height: int) -> None:
    """Refuse an image whose size on disk is not the one its COCO entry lists (the boxes would be misplaced)."""
    listed = (info.get("width"), info.get("height"))
    if None not in listed and listed != (width, height):
        raise DataError(
            f"{file!r} is {width}x{height} on disk, but its annotations say {listed[0]}x{listed[1]} (image id "
            f"{info.get('id')}): the boxes were drawn on another size. Fix the JSON's width/height (photos with "
            "an EXIF orientation are often listed rotated; store them upright) or re-export the annotations."
        )


def check_same_categories(theirs: list[dict[str, Any]], ours: dict[int, str], where: str, fix: str) -> None:
    """Refuse a label set that is not the model's: same ids with the same names, nothing extra."""
    found = {int(c["id"]): c.get("name") for c in theirs}
    if any(found.get(cid, name) != name for cid, name in ours.items()) or set(found) - set(ours):
        raise DataError(f"The {where} categories {found} differ from the model's categories {ours}. {fix}")


def coco_target(
    image: Tensor,
    record: dict[str, Any],
    label_of: dict[int, int],
    train: bool,
    flip: v2.Transform | None,
    extra_keys: list[str],
    name: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One image and its COCO record as the detector takes them, from files and from chunks alike.

    Boxes go from float32 XYWH to XYXY as torchvision's COCO wrapper converts them, clipped to the
    image; labels are contiguous (``label_of``); ``extra_keys`` are carried (-1 where missing). Crowd
    regions are left out of training (they are not objects to learn) and flagged ``iscrowd`` with
    ``area`` for evaluation, where COCO's rule ignores detections on them.
    """
    info, anns = record["image"], record["annotations"]
    height, width = image.shape[-2:]
    check_listed_size(name, info, width, height)
    xywh = tv_tensors.BoundingBoxes(
        torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
        format="XYWH",
        canvas_size=(height, width),
    )
    boxes = v2.ClampBoundingBoxes()(v2.functional.convert_bounding_box_format(xywh, new_format="XYXY"))
    if flip is not None:
        image, boxes = flip(tv_tensors.Image(image), boxes)
    crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
    out = {
        "boxes": boxes.as_subclass(Tensor).float(),
        "labels": torch.tensor([label_of[int(a["category_id"])] for a in anns], dtype=torch.int64),
        "image_id": torch.tensor(int(info["id"])),
    }
    for key in extra_keys:
        out[key] = torch.tensor([int(a.get(key, -1)) for a in anns], dtype=torch.int64)
    if train:
        keep = crowd == 0
        out = {k: v[keep] if v.dim() and len(v) == len(crowd) else v for k, v in out.items()}
    else:
        out["iscrowd"] = crowd
        out["area"] = torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)
    return image.as_subclass(Tensor), out


class _CocoSplit(Dataset):
    """One split of image files and their COCO records: ``(uint8 image, target)`` by :func:`coco_target`."""

    def __init__(
        self,
        images: Path,
        annotations: dict[str, Any],
        label_of: dict[int, int],
        train: bool,
        hflip: bool,
        extra_keys: list[str],
    ) -> None:
        from pycocotools.coco import COCO

        self.coco = COCO()  # its index only: the JSON was read (and checked) once already
        self.coco.dataset = annotations
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs.keys())
        self.root = images
        self.label_of = label_of
        self.train = train
        self.extra_keys = extra_keys
        self.flip = v2.RandomHorizontalFlip() if train and hflip else None

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, index: int) -> tuple[str, dict[str, Any]]:
        """The image file and its COCO record ``{"image": ..., "annotations": [...]}``."""
        info = self.coco.imgs[self.ids[index]]
        return str(self.root / info["file_name"]), {
            "image": info,
            "annotations": self.coco.imgToAnns.get(info["id"], []),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        file, record = self.record(index)
        try:
            image = decode_file(file)
        except DataError as err:
            raise DataError(
                f"Cannot read image {file!r} (image id {record['image']['id']}): {err.__cause__ or err}. Delete or "
                "replace this file (and remove its annotations) and rerun."
            ) from err
        return coco_target(image, record, self.label_of, self.train, self.flip, self.extra_keys, file)


class DetectionDataModule(LabelledDataModule):
    """What every detection data module shares: the label set, its checks, predict_root and the loaders.

    Subclasses implement :meth:`open_split` and :meth:`source_categories`; they may replace
    :meth:`make_loader`. COCO category ids need not be contiguous: they map, in id order, to labels
    1..num_classes (0 is background) and the names are kept (:attr:`classes`); :attr:`category_ids`
    maps back for results files.

    Args:
        predict_split: the split ``predict`` runs on ("val" or "test"); results keep its image ids.
        predict_root: a folder of new, unannotated images (searched recursively) that ``predict`` runs
            on instead of ``predict_split``; results name each file. No split is needed then.
        categories: ``[{"id": ..., "name": ...}, ...]``, the model's label set. Default: the training
            annotations' categories. The CLI sets it from the checkpoint with ``--ckpt_path`` (fit records
            it), so ``predict`` on new images needs no annotation file on that machine.
        batch_size: images per device per step.
        num_workers: DataLoader worker processes.
        hflip: random horizontal flips in training (turn off where flipping changes the class).
        pin_memory: pin host memory (default: when CUDA is available).
        seed: seed of the per-epoch shuffle (the order survives a resume).
        extra_keys: per-annotation integer fields carried into the targets (e.g. ``["identity"]`` for
            re-identification; -1 where an annotation lacks it).
    """

    task: ClassVar[str] = "detection"
    label_set_argument: ClassVar[str | None] = "categories"

    def __init__(
        self,
        predict_split: Literal["val", "test"] = "val",
        batch_size: int = 2,
        num_workers: int = 2,
        hflip: bool = True,
        pin_memory: bool | None = None,
        seed: int = 0,
        extra_keys: list[str] | None = None,
        predict_root: str | Path | None = None,
        categories: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        if predict_split not in ("val", "test"):
            raise DataError(f"predict_split={predict_split!r} is invalid: expected 'val' or 'test'.")
        self._categories = None if categories is None else check_categories(categories)
        self.predict_root = None if predict_root is None else Path(predict_root)
        self.predict_split = predict_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.extra_keys = list(extra_keys or [])
        self.datasets: dict[str, Dataset] = {}

    @abstractmethod
    def source_categories(self) -> list[dict[str, Any]]:
        """The categories the data itself lists (used when ``categories`` is not given)."""

    @abstractmethod
    def open_split(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split``, its categories checked against the model's (:meth:`check_categories`)."""

    @classmethod
    def label_set_from_record(cls, class_names: list[str] | None, category_ids: list[int] | None) -> Any:
        """``[{"id": ..., "name": ...}]`` from a checkpoint's names and ids (None unless both match up)."""
        if class_names and category_ids and len(class_names) == len(category_ids):
            return [{"id": i, "name": n} for i, n in zip(category_ids, class_names)]
        return None

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The model's categories in id order: ``categories`` when given, else the data's."""
        if self._categories is not None:
            return self._categories
        return sorted(self.source_categories(), key=lambda c: c["id"])

    @property
    def classes(self) -> list[str]:
        """Category names, label 1 first (label ``i`` is ``classes[i - 1]``)."""
        return [str(c.get("name", c["id"])) for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label, label 1 first: how results map back to the annotations."""
        return [int(c["id"]) for c in self.categories]

    @property
    def label_of(self) -> dict[int, int]:
        """Contiguous label of each category id (1 first; 0 is background)."""
        return {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    def check_categories(self, theirs: list[dict[str, Any]], where: str, fix: str) -> None:
        """Refuse a split whose categories are not the model's."""
        check_same_categories(theirs, dict(zip(self.category_ids, self.classes)), where, fix)

    def chunk_description(self) -> dict[str, Any]:
        """The categories, the extra keys, and the flip setting a streaming module left at None takes over."""
        return {"categories": self.categories, "extra_keys": self.extra_keys, "augment": {"hflip": self.hflip}}

    def prediction_names(self) -> list[str] | None:
        """The files of ``predict_root`` in order; None for a split (its results keep the COCO image ids)."""
        dataset = self.datasets.get("predict")
        return dataset.files if isinstance(dataset, UnlabelledImages) else None

    def setup(self, stage: str) -> None:
        """Open the splits this stage needs (their categories checked)."""
        if stage == "predict" and self.predict_root is not None:
            self.categories  # noqa: B018  (the label set must be known before the model writes names)
            self.datasets.setdefault("predict", UnlabelledImages(self.predict_root, decode_file, target={}))
        needed = STAGE_SPLITS.get(stage, (self.predict_split,) if self.predict_root is None else ())
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self.open_split(split, train=split == "train")

    def make_loader(self, split: str, dataset: Dataset, train: bool) -> Any:
        """A DataLoader over ``dataset`` (the training order from :class:`EpochShuffleSampler`)."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if train else None,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _loader(self, split: str, train: bool = False) -> Any:
        if split not in self.datasets:
            self.setup(SPLIT_STAGE.get(split, "predict"))  # a predict_split's name opens it through "predict"
        return self.make_loader(split, self.datasets[split], train)

    def train_dataloader(self) -> Any:
        """Shuffled training batches; the last partial batch is kept (frozen BN does not mind its size)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        """Validation batches in annotation order."""
        return self._loader("val")

    def test_dataloader(self) -> Any:
        """Test batches in annotation order."""
        return self._loader("test")

    def predict_dataloader(self) -> Any:
        """Batches of ``predict_root``'s files, or of ``predict_split`` with each image's COCO id in its target."""
        return self._loader("predict" if self.predict_root is not None else self.predict_split)


class CocoDetectionDataModule(DetectionDataModule):
    """COCO-format detection data: an image folder and a COCO JSON per split, for :class:`FrozenBNDetector`.

    Images without annotations stay in as background. Every annotation is checked before training
    (:func:`~lightning_frozenbn.data.annotations.read_annotations`): a missing image, an unknown
    category, a box of zero size or wholly outside its image is an error naming the annotation and the
    file; boxes that stick out are clipped. Targets come from :func:`coco_target`.

    Images come as uint8 ``(3, H, W)`` at their own size: the detector resizes and normalises on the
    device. Scale jitter is the detector's ``min_size`` list (one size drawn per image), as in
    torchvision's and detectron2's recipes; a resize here would be undone by it.

    Args:
        train_images, train_annotations: the training image folder and COCO JSON.
        val_images, val_annotations: the validation split (mAP is computed on it).
        test_images, test_annotations: an optional test split (``test``, or ``predict_split: test``).
        **kwargs: the settings every detection module shares (``batch_size``, ``categories``,
            ``predict_root``, ``extra_keys``, ...), documented on :class:`DetectionDataModule`.
    """

    def __init__(
        self,
        train_images: str | Path | None = None,
        train_annotations: str | Path | None = None,
        val_images: str | Path | None = None,
        val_annotations: str | Path | None = None,
        test_images: str | Path | None = None,
        test_annotations: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = {"train": (train_images, train_annotations), "val": (val_images, val_annotations)}
        given["test"] = (test_images, test_annotations)
        for split, (images, json_file) in given.items():
            if (images is None) != (json_file is None):
                raise DataError(f"Set both {split}_images and {split}_annotations, or neither.")
        self.paths: dict[str, tuple[Path, Path] | None] = {
            split: (Path(images), Path(json_file)) if images is not None else None
            for split, (images, json_file) in given.items()
        }
        self._annotations: dict[str, dict[str, Any]] = {}

    @property
    def source(self) -> str:
        """The training annotations (else the first split given)."""
        given = [paths[1] for paths in self.paths.values() if paths is not None]
        return str(given[0]) if given else "no annotation files"

    def _split_annotations(self, split: str) -> dict[str, Any]:
        if split not in self._annotations:
            paths = self.paths[split]
            if paths is None:
                raise DataError(
                    f"No {split} split: set `data.init_args.{split}_images` and `data.init_args.{split}_annotations`."
                )
            self._annotations[split] = read_annotations(paths[1], paths[0], split)
        return self._annotations[split]

    def source_categories(self) -> list[dict[str, Any]]:
        """The training annotations' categories."""
        if self.paths["train"] is None:
            raise DataError(
                "The categories are unknown: there is no training split to read them from. Pass the checkpoint "
                "with --ckpt_path (fit records them in it) or the exported file with --exported, or set "
                "`data.init_args.categories` "
                '(e.g. [{"id": 1, "name": "person"}, ...]).'
            )
        return self._split_annotations("train")["categories"]

    def open_split(self, split: str, train: bool) -> _CocoSplit:
        """The split's images and checked annotations; a checkpoint's label set is checked against train too."""
        data = self._split_annotations(split)
        if split != "train" or self._categories is not None:
            fix = f"({str(self.paths[split][1])!r}). Export both splits with the same label set."
            self.check_categories(data["categories"], split, fix)
        return _CocoSplit(self.paths[split][0], data, self.label_of, train, self.hflip, self.extra_keys)

    def chunk_splits(self) -> list[str]:
        """The splits given, in train, val, test order."""
        return [s for s in ("train", "val", "test") if self.paths[s] is not None]

    def chunk_entries(self, split: str) -> list[ChunkEntry]:
        """Each image with its COCO record, in image-id order; each header checked against its listed size."""
        if self.paths.get(split) is None:
            raise DataError(f"splits names {split!r}, but the data module has no {split} split.")
        dataset = self.open_split(split, train=False)
        entries = []
        for index in range(len(dataset)):
            file, record = dataset.record(index)
            check_listed_size(file, record["image"], *check_header(file))
            entries.append(ChunkEntry(file, record["image"]["file_name"], record=record))
        return entries
