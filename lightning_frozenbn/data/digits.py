"""The offline sets: scikit-learn's real digits written once as class folders or as COCO canvases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from lightning_frozenbn.data.coco import CocoDetectionDataModule
from lightning_frozenbn.data.folder import ImageFolderDataModule
from lightning_frozenbn.errors import DataError

__all__ = ["DigitsDataModule", "DigitsDetectionDataModule", "publish_complete"]


class DigitsDataModule(ImageFolderDataModule):
    """The 1,797 real handwritten digits that ship inside scikit-learn, written once as PNG files.

    Offline and real: ``prepare_data`` writes ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png``
    with a fixed, seeded, stratified split; from then on this *is* an ImageFolderDataModule, so the
    quickstart reads files exactly as a user's own data would be read. The 8x8 images are upscaled by
    the transforms to ``image_size``.

    Args:
        root: where to write the PNG tree (reused if complete).
        image_size, batch_size, num_workers: as for any image module, with the quickstart's defaults.
        min_scale, hflip: the training augmentation; no flips (a mirrored 2 is not a 2) and crops of at
            least 60% of an 8x8 digit.
        val_fraction: share of each digit class held out for validation.
        seed: seed of the split and of the shuffle order.
        **kwargs: the other image settings, documented on :class:`~lightning_frozenbn.data.images.ImageDataModule`.
    """

    def __init__(
        self,
        root: str | Path = "data/digits",
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 2,
        min_scale: float = 0.6,
        hflip: bool = False,
        val_fraction: float = 0.2,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            min_scale=min_scale,
            hflip=hflip,
            seed=seed,
            **kwargs,
        )
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction!r} is invalid: expected a fraction in (0, 1), e.g. 0.2.")
        self.val_fraction = val_fraction
        self.seed = seed

    @property
    def num_classes(self) -> int:
        """Ten digits, known before the files exist."""
        return 10

    def prepare_data(self) -> None:
        """Write the PNG tree once (atomically: a half-written tree is never mistaken for a complete one)."""
        if (self.root / ".complete").is_file():
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        generator = torch.Generator().manual_seed(self.seed)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=self.root.parent))
        for label in range(10):
            indices = [i for i, t in enumerate(digits.target) if t == label]
            order = torch.randperm(len(indices), generator=generator).tolist()
            n_val = round(len(indices) * self.val_fraction)
            for rank, position in enumerate(order):
                index = indices[position]
                split = "val" if rank < n_val else "train"
                folder = tmp / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype("uint8")
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        publish_complete(tmp, self.root, f"sklearn load_digits, val_fraction={self.val_fraction}, seed={self.seed}")


class DigitsDetectionDataModule(CocoDetectionDataModule):
    """An offline detection set from scikit-learn's real handwritten digits pasted on black canvases.

    ``prepare_data`` writes it once (atomically, seeded): ``root/{train,val}/*.png`` and
    ``root/{train,val}.json`` in COCO format, 10 categories "0".."9" with ids 1..10. Train and
    validation canvases draw from disjoint sets of source digits (no digit seen in training is scored).
    Each box is the tight box of the digit's ink; annotations carry ``identity`` (the source digit's
    index) for re-identification examples. From then on this *is* a CocoDetectionDataModule reading
    files, as a user's own export would be read.

    Args:
        root: where the set is written (reused if complete).
        canvas_size: canvas side in pixels.
        digit_size: (min, max) side of a pasted digit in pixels (the 8x8 source upscaled).
        digits_per_image: (min, max) digits per canvas, placed without overlap.
        num_train, num_val: canvases per split.
        val_fraction: share of the source digits reserved for validation canvases.
        seed: seed of the split, the layouts and the shuffle.
        batch_size, num_workers, pin_memory, extra_keys, predict_root: as for CocoDetectionDataModule.
    """

    def __init__(
        self,
        root: str | Path = "data/digits_detection",
        canvas_size: int = 128,
        digit_size: tuple[int, int] = (24, 48),
        digits_per_image: tuple[int, int] = (1, 3),
        num_train: int = 1200,
        num_val: int = 300,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        extra_keys: list[str] | None = None,
        predict_root: str | Path | None = None,
    ) -> None:
        root = Path(root)
        super().__init__(
            root / "train",
            root / "train.json",
            root / "val",
            root / "val.json",
            batch_size=batch_size,
            num_workers=num_workers,
            hflip=False,  # a mirrored 2 is not a 2
            pin_memory=pin_memory,
            seed=seed,
            extra_keys=extra_keys,
            predict_root=predict_root,
        )
        lo, hi = digit_size
        if not 8 <= lo <= hi < canvas_size:
            raise DataError(f"digit_size={tuple(digit_size)!r} must satisfy 8 <= min <= max < canvas_size.")
        if not 1 <= digits_per_image[0] <= digits_per_image[1]:
            raise DataError(f"digits_per_image={tuple(digits_per_image)!r} must satisfy 1 <= min <= max.")
        if not 0 < val_fraction < 1 or num_train < 1 or num_val < 1:
            raise DataError("val_fraction must be in (0, 1) and num_train, num_val >= 1.")
        self.root = root
        self.canvas_size = canvas_size
        self.digit_size = (lo, hi)
        self.digits_per_image = tuple(digits_per_image)
        self.num_train = num_train
        self.num_val = num_val
        self.val_fraction = val_fraction

    def source_categories(self) -> list[dict[str, Any]]:
        """The ten digits, known before the files exist."""
        return [{"id": d + 1, "name": str(d)} for d in range(10)]

    def prepare_data(self) -> None:
        """Write the canvases and the COCO JSON once; a half-written set is never mistaken for a complete one."""
        if (self.root / ".complete").is_file():
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(digits.target), generator=generator).tolist()
        n_val = round(len(order) * self.val_fraction)
        sources = {"val": order[:n_val], "train": order[n_val:]}
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".digits-detection-", dir=self.root.parent))
        for split, count in (("train", self.num_train), ("val", self.num_val)):
            (tmp / split).mkdir()
            coco = {"images": [], "annotations": [], "categories": self.source_categories()}
            for image_id in range(1, count + 1):
                canvas, boxes = self._canvas(digits, sources[split], generator)
                name = f"{image_id:05d}.png"
                Image.fromarray(canvas.numpy()).save(tmp / split / name)
                coco["images"].append(
                    {"id": image_id, "file_name": name, "width": canvas.shape[1], "height": canvas.shape[0]}
                )
                for (x0, y0, x1, y1), source in boxes:
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": int(digits.target[source]) + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": (x1 - x0) * (y1 - y0),
                            "iscrowd": 0,
                            "identity": source,
                        }
                    )
            (tmp / f"{split}.json").write_text(json.dumps(coco))
        publish_complete(tmp, self.root, f"sklearn load_digits on {self.canvas_size}px canvases, seed={self.seed}")

    def _canvas(
        self, digits: Any, pool: list[int], generator: torch.Generator
    ) -> tuple[Tensor, list[tuple[tuple[int, int, int, int], int]]]:
        size = self.canvas_size
        canvas = torch.zeros(size, size, dtype=torch.uint8)
        lo, hi = self.digits_per_image
        wanted = int(torch.randint(lo, hi + 1, (), generator=generator))
        placed: list[tuple[tuple[int, int, int, int], int]] = []
        for _ in range(wanted * 20):  # rejection sampling of non-overlapping spots
            if len(placed) == wanted:
                break
            side = int(torch.randint(self.digit_size[0], self.digit_size[1] + 1, (), generator=generator))
            x, y = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
            if any(x < b[2] and b[0] < x + side and y < b[3] and b[1] < y + side for b, _ in placed):
                continue
            source = pool[int(torch.randint(len(pool), (), generator=generator))]
            pixels = torch.from_numpy(digits.images[source]).float()[None, None] * (255.0 / 16.0)
            patch = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
            patch = patch[0, 0].round().clamp(0, 255).to(torch.uint8)
            ink = (patch > 32).nonzero()
            if len(ink) == 0:
                continue
            region = canvas[y : y + side, x : x + side]
            torch.maximum(region, patch, out=region)
            (top, left), (bottom, right) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
            placed.append(((x + left, y + top, x + right + 1, y + bottom + 1), source))
        return canvas, placed


def _written_by_us(root: Path) -> bool:
    """Whether ``root`` holds only what the digits writers write (train/val folders of PNGs, split JSONs).

    Only such a folder without its ``.complete`` marker (an older, non-atomic writer's leftover) may be
    replaced; a user's own folder or file given as ``root`` by mistake never is.
    """
    if not root.is_dir():
        return False
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if parts[0] not in ("train", "val", "train.json", "val.json"):
            return False
        if path.is_file() and len(parts) > 1 and path.suffix != ".png":
            return False
        if path.is_dir() and len(parts) > 1 and not (len(parts) == 2 and parts[1].isdigit()):
            return False
    return True


def publish_complete(tmp: Path, root: Path, description: str) -> None:
    """Mark the tree written in ``tmp`` complete and move it to ``root`` in one rename.

    A half-written tree is never mistaken for a complete one (``root/.complete`` is the marker). Several
    nodes on a shared filesystem may write at once (prepare_data runs once per node): the first complete
    tree wins and is never deleted; the others drop their own copy.
    """
    if root.exists() and not (root / ".complete").is_file() and not _written_by_us(root):
        shutil.rmtree(tmp, ignore_errors=True)
        what = "is a file" if not root.is_dir() else "is a folder of other files"
        raise DataError(
            f"Cannot write the {description.split(',')[0]} set to {str(root)!r}: it {what}, not a set this package "
            "wrote, and nothing of yours is replaced. Set `data.init_args.root` to a new folder (e.g. data/digits)."
        )
    (tmp / ".complete").write_text(description + "\n")
    for _ in range(3):
        if (root / ".complete").is_file():  # another node (or an earlier run) published it: drop our copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            os.replace(tmp, root)  # fails while root is a non-empty folder: never replaces a complete tree
            return
        except OSError:
            if (root / ".complete").is_file():
                continue
        # an incomplete leftover of a killed writer: moved aside in one rename before it is deleted, so
        # nothing is deleted under a path another node may be publishing to at this moment
        aside = root.with_name(f".{root.name}-stale-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(root, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise DataError(f"Could not publish {root}: it keeps changing (another writer?). Delete it and rerun.")
