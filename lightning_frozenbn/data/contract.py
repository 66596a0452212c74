"""LabelledDataModule: what every labelled data module promises the CLI, checkpoints, chunks and prediction files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, NamedTuple

import lightning.pytorch as pl

from lightning_frozenbn.errors import DataError

__all__ = ["SPLIT_STAGE", "STAGE_SPLITS", "ChunkEntry", "LabelledDataModule", "Task"]

Task = Literal["classification", "detection"]
# Lightning's stages and the splits each one reads, and the stage whose setup opens a split
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


def check_loader_settings(batch_size: Any, num_workers: Any) -> None:
    """Refuse a batch size under 1 or a negative worker count when the data module is built, not at the first batch."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{name}={value!r} is invalid: expected an integer >= {least}.")


class ChunkEntry(NamedTuple):
    """One sample of a split, as ``lightning-frozenbn-optimize`` writes it into chunks.

    Attributes:
        file: the image file; its bytes are stored untouched.
        name: how messages and prediction files name the sample (e.g. its path below the split folder).
        label: the class index (classification; -1 for detection).
        record: the COCO record ``{"image": <image entry>, "annotations": [...]}`` (detection; None otherwise).
    """

    file: str
    name: str
    label: int = -1
    record: dict[str, Any] | None = None


class LabelledDataModule(pl.LightningDataModule, ABC):
    """The contract between a labelled data module and the rest of this package.

    Why a contract: the class names travel from the data to the model (``num_classes``), into every
    checkpoint (so that ``predict`` on another machine names classes without the training data), into
    chunk manifests and into prediction files. Those readers ask these methods and nothing else, so a
    data module of your own (a CSV of files, a database, a web dataset) that subclasses this one and
    implements them is checkpointed, optimized into chunks (``lightning-frozenbn-optimize``) and
    predicted with exactly as the folder and COCO modules are.

    To implement: :attr:`classes` (label order), and for chunks :meth:`chunk_splits` and
    :meth:`chunk_entries`; for prediction files :meth:`prediction_names`. Detection modules set
    ``task = "detection"`` and also give :attr:`category_ids`. The defaults say "not supported" loudly.

    Class attributes:
        task: "classification" (labels 0..num_classes-1) or "detection" (labels 1..num_classes, 0 background).
        label_set_argument: the ``__init__`` argument that takes the label set, which the CLI fills from
            the checkpoint given with ``--ckpt_path`` when the config leaves it ``None`` (so predicting on
            new images needs no training data). None: the module takes no label set.
    """

    task: ClassVar[Task] = "classification"
    label_set_argument: ClassVar[str | None] = "class_names"

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Class names in label order (detection: label 1 first)."""

    @property
    def num_classes(self) -> int:
        """Number of classes (background not counted); the CLI links it into the model."""
        return len(self.classes)

    @property
    def category_ids(self) -> list[int] | None:
        """The dataset's id of each label, label 1 first (COCO category ids); None for classification."""
        return None

    @property
    def source(self) -> str:
        """Where the data comes from, as messages name it (a folder, an annotation file, a bucket)."""
        return type(self).__name__

    @classmethod
    def label_set_from_record(cls, class_names: list[str] | None, category_ids: list[int] | None) -> Any:
        """The value of :attr:`label_set_argument` that a checkpoint's recorded label set gives (None: none)."""
        return class_names

    def chunk_description(self) -> dict[str, Any]:
        """What a chunk folder's manifest records of this data besides its samples (the label set, settings).

        A streaming module reads it back: ``classes`` for classification; ``categories`` and
        ``extra_keys`` for detection; ``augment`` holds the augmentation settings a streaming module
        left at None takes over.
        """
        return {"classes": list(self.classes), "augment": {}}

    def chunk_splits(self) -> list[str]:
        """The splits this data has, in the order they are written (e.g. ``["train", "val"]``)."""
        raise DataError(self._unsupported("chunk_splits", "be optimized into chunks"))

    def chunk_entries(self, split: str) -> list[ChunkEntry]:
        """The samples of ``split`` in the split's order (their index is their position), checked."""
        raise DataError(self._unsupported("chunk_entries", "be optimized into chunks"))

    def prediction_names(self) -> list[str] | None:
        """The name of each sample ``predict_dataloader`` yields, in its order; None: named by index."""
        return None

    def _unsupported(self, method: str, what: str) -> str:
        return (
            f"{type(self).__name__} cannot {what}: it does not implement LabelledDataModule.{method}. "
            "Implement it (see docs/data.md, 'Your own data module')."
        )
