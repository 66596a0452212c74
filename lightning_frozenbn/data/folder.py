"""ImageFolderDataModule: class folders of images on disk, decoded to uint8 and normalised on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_frozenbn.data.contract import ChunkEntry
from lightning_frozenbn.data.image_files import visible_image, why_not_a_folder
from lightning_frozenbn.data.images import ImageDataModule
from lightning_frozenbn.errors import DataError

__all__ = ["ImageFolderDataModule", "check_header"]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_header(path: str) -> tuple[int, int]:
    """An image file's (width, height) from its header, or one :class:`DataError` naming the file.

    What ``lightning-frozenbn-optimize`` asks of every file before it writes anything: a file that
    cannot be read, or a text file named ``.jpg``, is refused in the main process instead of being
    written into the chunks and breaking training later, far from its cause.
    """
    try:
        with Image.open(path) as image:  # the header only
            return image.size
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(
            f"Cannot read image {path!r}: {err}. Delete or replace this file and rerun; nothing was written."
        ) from err


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder minus hidden entries (``.ipynb_checkpoints/``, macOS ``._x.jpg`` files).

    torchvision counts a hidden folder as a class: labels would then disagree with ``num_classes``
    (which skips it) and with the other splits; a hidden ``._x.jpg`` is not an image at all.
    """

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = _class_dirs(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Any = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        def visible(path: str) -> bool:
            return visible_image(path, directory)

        return ImageFolder.make_dataset(directory, class_to_idx, None, visible, allow_empty)


class ImageFolderDataModule(ImageDataModule):
    """Images in ``root/train/<class>/``, ``root/val/<class>/`` and optionally ``root/test/<class>/``.

    ImageNet-style transforms and normalisation (the statistics the pretrained weights expect):
    random-resized crop (+ optional horizontal flip) for training; resize to ``image_size / 0.875`` and
    centre crop for evaluation. The folder layout is checked before any training starts.

    By default (``decode="tensor"``) the workers decode with ``torchvision.io`` and crop uint8 tensors
    with ``transforms.v2``; the uint8 batches are pinned, sent to the device and only there converted
    to float and normalised (:meth:`on_after_batch_transfer`), in channels_last when the model's
    convolutions are. That is the same function as the PIL path (same decoded pixels, same crop
    sampling, resized values within one intensity level) at about half the worker time and a quarter
    of the bytes per batch. Batches from :meth:`train_dataloader` used outside a Trainer are uint8:
    pass them through :meth:`normalize`. ``decode="pil"`` keeps the classic PIL + ``ToTensor`` path.

    With ``decode_device="cuda"`` the workers only read the files and plan the crops; JPEGs are then
    decoded in batches on the GPU (nvJPEG), cropped, resized and normalised there. Use it when the CPU
    workers cannot keep up with the GPU; where CUDA or nvJPEG is missing it falls back to the workers,
    with a warning saying why.

    Args:
        root: dataset root holding the split folders.
        **kwargs: the image settings (``image_size``, ``batch_size``, ``decode``, ``decode_device``, ...),
            documented on :class:`~lightning_frozenbn.data.images.ImageDataModule`.
    """

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)

    @property
    def source(self) -> str:
        """The data root."""
        return str(self.root)

    @property
    def num_classes(self) -> int:
        """Number of class folders in the train split (linked into the model by the CLI)."""
        classes = self.classes
        if len(classes) < 2:
            raise DataError(
                f"{str(self.root / 'train')!r} has one class folder ({classes[0]!r}): a classifier needs at "
                "least two. Put each class's images in its own folder under train/ and val/."
            )
        return len(classes)

    @property
    def classes(self) -> list[str]:
        """Class names, in label order: ``class_names`` when given, else the train split's folders."""
        if self.class_names is not None:
            return self.class_names
        if self.predict_root is not None and not (self.root / "train").is_dir():
            raise DataError(
                "predict_root needs the class names and there is no train split to read them from: run "
                "`predict` with --ckpt_path of a checkpoint trained by this package (it stores them), or set "
                "`data.init_args.class_names`."
            )
        return self._check_split("train")

    def _check_split(self, split: str) -> list[str]:
        if not self.root.is_dir():
            raise DataError(
                f"Data root {str(self.root)!r} {why_not_a_folder(self.root)}. Set `data.root` (or "
                "`data.init_args.root`) to a folder holding train/<class>/ and val/<class>/ image folders."
            )
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(
                f"Split folder {str(split_dir)!r} is missing: expected {split}/<class>/ under {str(self.root)!r}."
            )
        classes = _class_dirs(split_dir)
        if not classes:
            raise DataError(
                f"{str(split_dir)!r} has no class folders: put each class's images in {split}/<class name>/."
            )
        for name in classes:
            if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (split_dir / name).iterdir() if f.is_file()):
                raise DataError(
                    f"Class folder {str(split_dir / name)!r} holds no images "
                    f"(extensions: {', '.join(IMG_EXTENSIONS)}). "
                    "Add images or remove the folder from every split."
                )
        return classes

    def open_split(self, split: str, train: bool) -> _ImageFolder:
        """The split's folder as torchvision's ImageFolder (hidden entries skipped), checked against train's classes."""
        classes = self._check_split(split)
        train_classes = self.classes if split != "train" or self.class_names is not None else classes
        if classes != train_classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_here = sorted(set(classes) - set(train_classes))
            if self.class_names is not None:  # given, or from the checkpoint: the model's classes
                raise DataError(
                    f"Split {split!r} has other classes than the model (class_names / the checkpoint): only in "
                    f"the model: {only_train or 'none'}; only in {split}: {only_here or 'none'}. Point "
                    "`data.init_args.root` at data with the model's class folders."
                )
            raise DataError(
                f"Split {split!r} and 'train' have different classes (only in train: {only_train or 'none'}; "
                f"only in {split}: {only_here or 'none'}). Labels are folder indices, so every split needs "
                "the same class folders."
            )
        loader, transform = self.decoding.reader(train)
        return _ImageFolder(str(self.root / split), transform=transform, loader=loader)

    # ---- the chunk writer's part of the contract ---------------------------------------------
    def chunk_description(self) -> dict[str, Any]:
        """The class names, and the augmentation a streaming module left at None takes over.

        Why the augmentation: DigitsDataModule's ``min_scale=0.6`` and no flips are not the folder
        module's defaults, and a switch to streaming must not change the training quietly.
        """
        return {"classes": self.classes, "augment": {"min_scale": self.min_scale, "hflip": self.hflip}}

    def chunk_splits(self) -> list[str]:
        """Every split folder present, in train, val, test order."""
        return [s for s in ("train", "val", "test") if (self.root / s).is_dir()]

    def chunk_entries(self, split: str) -> list[ChunkEntry]:
        """The split's files in ImageFolder order, each header checked; named by their path below the split."""
        dataset = self.open_split(split, train=False)  # checked: layout, classes agree with train
        root = Path(dataset.root)
        entries = []
        for path, label in dataset.samples:
            check_header(path)
            entries.append(ChunkEntry(path, str(Path(path).relative_to(root)), label))
        return entries
