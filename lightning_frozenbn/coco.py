"""CocoDetectionDataModule: COCO-format boxes for the detector, checked and read as labelling tools write them."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from lightning_frozenbn.annotations import check_categories, read_annotations
from lightning_frozenbn.data import (
    EpochShuffleSampler,
    predict_files,
)
from lightning_frozenbn.decode import DataError, decode_file

__all__ = ["CocoDetectionDataModule", "check_listed_size", "collate_detection"]

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


class _ParsedCocoDetection(CocoDetection):
    """torchvision's ``CocoDetection`` over annotations parsed (and checked) already: the JSON is read once.

    ``CocoDetection.__init__`` would read and parse the file again (on train2017's 450 MB JSON, seconds
    and its size in memory once more); the rest of the class, and ``wrap_dataset_for_transforms_v2``, is
    torchvision's.
    """

    def __init__(self, root: Path, annotations: dict[str, Any]) -> None:
        VisionDataset.__init__(self, str(root))
        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = annotations
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs.keys())


class _CocoSplit(Dataset):
    """One split: ``(uint8 image, target)`` with contiguous labels, crowd boxes dropped or flagged, extras kept."""

    def __init__(
        self,
        images: Path,
        annotations: dict[str, Any],
        label_of: dict[int, int],
        train: bool,
        hflip: bool,
        extra_keys: list[str],
    ) -> None:
        coco = _ParsedCocoDetection(images, annotations)
        self.coco = coco.coco
        self.ids = coco.ids
        self.root = images
        keys = {"boxes", "labels", "image_id", "iscrowd", "area"}
        self.dataset = wrap_dataset_for_transforms_v2(coco, target_keys=keys)
        self.label_of, self.train, self.extra_keys = label_of, train, extra_keys
        steps: list[v2.Transform] = [v2.PILToTensor(), v2.ClampBoundingBoxes()]
        if train and hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        file = self.root / info["file_name"]
        try:
            image, target = self.dataset[index]
        except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated, not an image, bad header
            raise DataError(
                f"Cannot read image {str(file)!r} (image id {image_id}): {err}. Delete or replace this file "
                "(and remove its annotations) and rerun."
            ) from err
        check_listed_size(str(file), info, image.width, image.height)
        if "boxes" not in target:  # an image without annotations: background only, kept
            h, w = image.height, image.width
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w))
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["iscrowd"] = torch.zeros(0, dtype=torch.int64)
            target["area"] = torch.zeros(0)
        image, boxes = self.transform(image, target["boxes"])
        labels = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
        crowd = torch.as_tensor(target["iscrowd"], dtype=torch.int64).reshape(-1)
        out = {"boxes": boxes.as_subclass(Tensor).float(), "labels": labels, "image_id": torch.tensor(image_id)}
        if self.extra_keys:  # the annotations in the wrapper's order; looked up only when extras are asked for
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
            for key in self.extra_keys:
                out[key] = torch.tensor([int(a.get(key, -1)) for a in anns], dtype=torch.int64)
        if self.train:  # crowd regions are not objects to learn; COCO evaluation ignores them instead
            keep = crowd == 0
            out = {k: v[keep] if v.dim() and len(v) == len(crowd) else v for k, v in out.items()}
        else:  # evaluation: COCO's rule ignores detections on crowd regions, and sizes objects by 'area'
            out["iscrowd"] = crowd
            out["area"] = torch.as_tensor(target["area"], dtype=torch.float32).reshape(-1)
        return image.as_subclass(Tensor), out


class _UnlabelledImages(Dataset):
    """Every visible image file under ``root``, recursively, in sorted path order: ``(uint8 image, {})``."""

    def __init__(self, root: Path) -> None:
        self.files = predict_files(root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return decode_file(self.files[index]), {}


class CocoDetectionDataModule(pl.LightningDataModule):
    """COCO-format detection data: an image folder and a COCO JSON per split, for :class:`FrozenBNDetector`.

    Read through ``torchvision.datasets.CocoDetection`` and ``wrap_dataset_for_transforms_v2`` (boxes
    as ``tv_tensors.BoundingBoxes``, so the v2 transforms move them with the pixels). COCO category
    ids need not be contiguous: they map, in id order, to labels 1..num_classes (0 is background) and
    the names are kept (:attr:`classes`); :attr:`category_ids` maps back for results files. Images
    without annotations stay in as background. Crowd boxes are left out of training and flagged
    ``iscrowd`` for evaluation, where COCO's rule ignores detections on them. Every annotation is
    checked before training: a missing image, an unknown category, a box of zero size or wholly
    outside its image is an error naming the annotation and the file; boxes that stick out are clipped.

    Images come as uint8 ``(3, H, W)`` at their own size: the detector resizes and normalises on the
    device. Scale jitter is the detector's ``min_size`` list (one size drawn per image), as in
    torchvision's and detectron2's recipes; a resize here would be undone by it.

    Args:
        train_images, train_annotations: the training image folder and COCO JSON.
        val_images, val_annotations: the validation split (mAP is computed on it).
        test_images, test_annotations: an optional test split (``test``, or ``predict_split: test``).
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

    def __init__(
        self,
        train_images: str | Path | None = None,
        train_annotations: str | Path | None = None,
        val_images: str | Path | None = None,
        val_annotations: str | Path | None = None,
        test_images: str | Path | None = None,
        test_annotations: str | Path | None = None,
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
        for name, value in (("batch_size", batch_size), ("num_workers", num_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise DataError(f"{name}={value!r} is invalid: expected an integer >= {int(name == 'batch_size')}.")
        if predict_split not in ("val", "test"):
            raise DataError(f"predict_split={predict_split!r} is invalid: expected 'val' or 'test'.")
        given = {"train": (train_images, train_annotations), "val": (val_images, val_annotations)}
        given["test"] = (test_images, test_annotations)
        for split, (images, json_file) in given.items():
            if (images is None) != (json_file is None):
                raise DataError(f"Set both {split}_images and {split}_annotations, or neither.")
        self.paths: dict[str, tuple[Path, Path] | None] = {
            split: (Path(images), Path(json_file)) if images is not None else None
            for split, (images, json_file) in given.items()
        }
        self._categories = None if categories is None else check_categories(categories)
        self.predict_root = None if predict_root is None else Path(predict_root)
        self.predict_split = predict_split
        self.batch_size, self.num_workers, self.hflip, self.seed = batch_size, num_workers, hflip, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.extra_keys = list(extra_keys or [])
        self._annotations: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, _CocoSplit] = {}

    # ---- the label set, known from the training annotations --------------------------------
    def _split_annotations(self, split: str) -> dict[str, Any]:
        if split not in self._annotations:
            paths = self.paths[split]
            if paths is None:
                raise DataError(
                    f"No {split} split: set `data.init_args.{split}_images` and `data.init_args.{split}_annotations`."
                )
            self._annotations[split] = read_annotations(paths[1], paths[0], split)
        return self._annotations[split]

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The model's categories in id order: ``categories`` when given, else the training annotations'."""
        if self._categories is not None:
            return self._categories
        if self.paths["train"] is None:
            raise DataError(
                "The categories are unknown: there is no training split to read them from. Pass the checkpoint "
                "with --ckpt_path (fit records them in it), or set `data.init_args.categories` "
                '(e.g. [{"id": 1, "name": "person"}, ...]).'
            )
        return sorted(self._split_annotations("train")["categories"], key=lambda c: c["id"])

    @property
    def num_classes(self) -> int:
        """Number of object categories (background not counted); linked to the model by the CLI."""
        return len(self.categories)

    @property
    def classes(self) -> list[str]:
        """Category names, label 1 first (label ``i`` is ``classes[i - 1]``)."""
        return [str(c.get("name", c["id"])) for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label, label 1 first: how results map back to the annotations."""
        return [int(c["id"]) for c in self.categories]

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the annotations of the splits this stage needs and build their datasets."""
        predict = [] if self.predict_root is not None else [self.predict_split]
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": predict}
        if stage == "predict" and self.predict_root is not None and "predict" not in self._datasets:
            self.categories  # noqa: B018  (the label set must be known before the model writes names)
            self._datasets["predict"] = _UnlabelledImages(self.predict_root)
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        for split in needed.get(stage, []):
            if split in self._datasets:
                continue
            data = self._split_annotations(split)
            if split != "train" or self._categories is not None:  # a checkpoint's label set is checked too
                theirs = {int(c["id"]): c.get("name") for c in data["categories"]}
                ours = {cid: name for cid, name in zip(self.category_ids, self.classes)}
                if any(theirs.get(cid, name) != name for cid, name in ours.items()) or set(theirs) - set(ours):
                    raise DataError(
                        f"The {split} categories {theirs} differ from the model's categories {ours} "
                        f"({str(self.paths[split][1])!r}). Export both splits with the same label set."
                    )
            images = self.paths[split][0]
            self._datasets[split] = _CocoSplit(images, data, label_of, split == "train", self.hflip, self.extra_keys)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self._datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if train else None,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last partial batch is kept (frozen BN does not mind its size)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in annotation order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in annotation order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``predict_root``'s files, or of ``predict_split`` with each image's COCO id in its target."""
        return self._loader("predict" if self.predict_root is not None else self.predict_split)
