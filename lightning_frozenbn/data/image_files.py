"""Image files on disk: which files count as images, and a folder of new images to predict on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_frozenbn.errors import DataError

__all__ = ["UnlabelledImages", "predict_files", "visible_image", "why_not_a_folder"]


def visible_image(path: str | Path, root: str | Path) -> bool:
    """An image file by its extension, with no hidden part (``.ipynb_checkpoints/``, ``._x.jpg``) below ``root``."""
    parts = Path(path).relative_to(root).parts
    return str(path).lower().endswith(IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)


def why_not_a_folder(path: Path) -> str:
    """``"does not exist"`` or ``"is a file, not a folder"``: a file given as a folder is not "missing"."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def predict_files(root: Path) -> list[str]:
    """Every visible image file under ``predict_root``, recursively, in sorted path order (never empty)."""
    if not root.is_dir():
        raise DataError(f"predict_root {str(root)!r} {why_not_a_folder(root)}: point it at a folder of images.")
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file() and visible_image(p, root)]
    if not files:
        raise DataError(f"predict_root {str(root)!r} holds no images (extensions: {', '.join(IMG_EXTENSIONS)}).")
    return files


class UnlabelledImages(Dataset):
    """Every visible image file under ``root``, recursively, in sorted path order, with no label.

    Items are ``(transform(loader(file)), target)``: ``target`` is -1 for classification and ``{}`` for
    detection, so the batches have the shape of the labelled splits'. ``samples`` lists
    ``(file, target)`` and ``classes`` the model's class names, as torchvision's ImageFolder has them.
    """

    def __init__(
        self,
        root: Path,
        loader: Callable[[str], Any],
        transform: Any = None,
        target: Any = -1,
        classes: list[str] | None = None,
    ) -> None:
        self.samples = [(file, target) for file in predict_files(root)]
        self.loader = loader
        self.transform = transform
        self.classes = classes

    @property
    def files(self) -> list[str]:
        """The image files in order."""
        return [file for file, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        sample = self.loader(path)
        target = dict(target) if isinstance(target, dict) else target  # a fresh dict per item
        return (sample if self.transform is None else self.transform(sample)), target
