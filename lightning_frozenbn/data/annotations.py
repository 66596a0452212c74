"""COCO annotation files, read and checked as labelling tools really write them, before anything trains."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from lightning_frozenbn.data.image_files import why_not_a_folder
from lightning_frozenbn.errors import DataError

__all__ = ["check_categories", "read_annotations"]


def read_annotations(path: Path, images: Path, split: str) -> dict[str, Any]:
    """Load and check a COCO JSON; every problem names the file, the id and the fix."""
    if not path.is_file():
        raise DataError(
            f"{split} annotations {str(path)!r} do not exist. Point `data.init_args.{split}_annotations` at a "
            "COCO-format JSON file (what labelling tools export as 'COCO')."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{split} annotations {str(path)!r} are not valid JSON: {err}. Re-export the file.") from err
    if not isinstance(data, dict):
        raise DataError(
            f"{split} annotations {str(path)!r} are not COCO detection annotations: the file holds a JSON "
            f"{type(data).__name__} ({len(data) if isinstance(data, list) else 1} entries), not an object with "
            "'images', 'annotations' and 'categories'. Export in COCO format."
        )
    missing_keys = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing_keys:
        raise DataError(
            f"{split} annotations {str(path)!r} are not COCO detection annotations: no list "
            f"{', '.join(repr(k) for k in missing_keys) or 'at the top level'}. Export in COCO format "
            "(images, annotations, categories)."
        )
    if not data["images"]:
        raise DataError(f"{split} annotations {str(path)!r} list no images: the split is empty. Add images.")
    if not data["categories"]:
        raise DataError(f"{str(path)!r} defines no categories. Export the label set with the annotations.")
    if not images.is_dir():
        raise DataError(
            f"{split} image folder {str(images)!r} {why_not_a_folder(images)}. Set `data.init_args.{split}_images`."
        )
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            shown = f"image id {image.get('id')!r}" if isinstance(image, dict) else f"image entry {image!r}"
            raise DataError(
                f"{shown} in {str(path)!r} has no 'file_name' (or no 'id'): every entry of 'images' needs both, "
                f"the file name relative to {str(images)!r}. Add it, or remove the image."
            )
    _integer_image_ids(data, path)
    sizes = {}
    absent = []
    for image in data["images"]:
        sizes[image["id"]] = (image.get("width"), image.get("height"), image["file_name"])
        if not (images / image["file_name"]).is_file():
            absent.append(f"{image['file_name']} (image id {image['id']})")
    if absent:
        more = f" ... and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise DataError(
            f"{len(absent)} image(s) listed in {str(path)!r} are missing from {str(images)!r}: "
            f"{', '.join(absent[:5])}{more}. Copy them there, or remove them from the annotations."
        )
    categories = {c["id"] for c in data["categories"]}
    clipped = []
    for ann in data["annotations"]:
        where = f"annotation id {ann.get('id')} (image id {ann.get('image_id')}) in {str(path)!r}"
        if ann.get("image_id") not in sizes:
            raise DataError(f"{where} points at an image id that is not listed in 'images'. Fix or remove it.")
        width, height, file = sizes[ann["image_id"]]
        where = f"annotation id {ann.get('id')} of {file!r} in {str(path)!r}"
        if ann.get("category_id") not in categories:
            raise DataError(
                f"{where} has category_id {ann.get('category_id')!r}, which is not among the categories "
                f"({sorted(categories)}). Fix the id or add the category."
            )
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise DataError(f"{where} has bbox {box!r}: expected [x, y, width, height] in pixels.")
        x, y, w, h = box
        if not (w > 0 and h > 0 and all(math.isfinite(v) for v in box)):
            raise DataError(
                f"{where} has a box of zero or negative size: bbox {box} ([x, y, width, height]). Remove it "
                "or fix its width and height."
            )
        if width is not None and height is not None:
            inside_w, inside_h = min(x + w, width) - max(x, 0), min(y + h, height) - max(y, 0)
            if inside_w <= 0 or inside_h <= 0:
                _check_size_on_disk(images / file, width, height, path)
                raise DataError(
                    f"{where} has bbox {box}, entirely outside its {width}x{height} image. Remove it or fix it."
                )
            if inside_w < w or inside_h < h:
                clipped.append(str(ann.get("id")))
        # What exporters leave out, as pycocotools reads it: not a crowd; the area of the box. Written into
        # every annotation, so that torchvision's wrapper keeps each flag and area with its own box.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w * h))
    if clipped:
        rank_zero_warn(
            f"{len(clipped)} box(es) in {str(path)!r} extend past their image and are clipped to it "
            f"(annotation ids {', '.join(clipped[:5])}{' ...' if len(clipped) > 5 else ''})."
        )
    return data


def _integer_image_ids(data: dict[str, Any], path: Path) -> None:
    """Map string image ids (some exporters write file stems) to 1..N in file order, keeping the originals.

    pycocotools and the metric need integers. The original id stays in each image entry as
    ``original_id``; annotations follow the mapping.
    """
    ids = [image["id"] for image in data["images"]]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return
    if len(set(map(str, ids))) != len(ids):
        raise DataError(f"{str(path)!r} lists an image id twice among {len(ids)} images. Make the image ids unique.")
    first = next(i for i in ids if not (isinstance(i, int) and not isinstance(i, bool)))
    new_id = {original: n + 1 for n, original in enumerate(ids)}
    for image in data["images"]:
        image["original_id"], image["id"] = image["id"], new_id[image["id"]]
    for ann in data["annotations"]:
        if isinstance(ann, dict) and ann.get("image_id") in new_id:
            ann["image_id"] = new_id[ann["image_id"]]
    rank_zero_info(
        f"{str(path)!r} has non-integer image ids (the first: {first!r}): mapped to 1..{len(ids)} in file order "
        "for evaluation; each image entry keeps its own as 'original_id'."
    )


def _check_size_on_disk(file: Path, width: int, height: int, path: Path) -> None:
    """A box outside the JSON's image size may be a JSON whose size is wrong: say so, not that the box is."""
    try:
        with Image.open(file) as image:
            actual = image.size
    except OSError:
        return  # an unreadable file is reported where it is read
    if actual != (width, height):
        raise DataError(
            f"{file.name!r} is {actual[0]}x{actual[1]} on disk, but {str(path)!r} says {width}x{height}. The "
            "boxes are checked against the JSON's size: fix its width/height (photos with an EXIF orientation "
            "are often listed rotated; store them upright) or re-export the annotations."
        )


def check_categories(categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"id", "name"}, ...]`` in id order, ids distinct integers: the label set given instead of read."""
    try:
        ids = [int(c["id"]) for c in categories]
        out = sorted(
            ({"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories), key=lambda c: c["id"]
        )
    except (KeyError, TypeError, ValueError):
        ids, out = [], []
    if not out or len(set(ids)) != len(ids):
        raise DataError(
            f"categories={categories!r} is invalid: expected a list of {{'id': <int>, 'name': <str>}}, distinct ids."
        )
    return out
