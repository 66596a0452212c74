"""Prediction writers: the classifier's CSV and the detector's COCO results JSON, ranks gathered, written whole."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_frozenbn.data.contract import LabelledDataModule
from lightning_frozenbn.files import write_atomically

__all__ = ["CocoResultsWriter", "PredictionWriter", "gather_to_rank_zero"]


def gather_to_rank_zero(trainer: pl.Trainer, rows: dict[Any, Any]) -> dict[Any, Any]:
    """Every rank's ``rows`` merged under DDP, each key once (the first rank's value).

    The distributed sampler repeats a few items to even out the ranks; a repeat must not be written twice.
    """
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return rows
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, rows)
    merged: dict[Any, Any] = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


class PredictionWriter(BasePredictionWriter):
    """Write ``file, predicted_class, probability`` rows to a CSV file after ``predict``.

    One file in the dataset's order (sorted paths), whatever the number of processes: under DDP the
    ranks' rows are gathered and rank 0 writes them, each file once (the distributed sampler may repeat
    a few to even out the ranks). Written whole or not at all (:func:`~lightning_frozenbn.files.write_atomically`).

    Args:
        output: the CSV path.
    """

    def __init__(self, output: str | Path = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        """Map each prediction back to its file and class name (the data module's contract, else the dataset's)."""
        files, classes = _names(trainer)
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        rows: dict[int, tuple[str, str, str]] = {}
        for probs, batch_idx in zip(preds, indices):
            confidence, label = probs.float().max(dim=-1)
            for i, c, p in zip(batch_idx, label.tolist(), confidence.tolist()):
                file = files[i] if files is not None else str(i)
                name = classes[c] if classes is not None else str(c)
                rows[int(i)] = (file, name, f"{p:.6f}")
        rows = gather_to_rank_zero(trainer, rows)
        if trainer.global_rank != 0:
            return
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["file", "predicted_class", "probability"])
        writer.writerows(rows[i] for i in sorted(rows))
        write_atomically(self.output, lambda f: f.write(text.getvalue().encode()))
        print(f"{len(rows)} predictions written to {self.output}")


class CocoResultsWriter(BasePredictionWriter):
    """Write ``predict`` detections as a COCO results JSON: ``image_id, category_id, bbox [x, y, w, h], score``.

    The file loads with ``pycocotools.coco.COCO.loadRes`` against the predicted split's annotations
    (the image and category ids are theirs). On new images (``data.init_args.predict_root``) there are
    no image ids: each row names its ``file`` and its ``category`` (the name) beside the category id,
    files in sorted path order. Under DDP the ranks' detections are gathered and rank 0 writes one
    file, atomically.

    Args:
        output: the JSON path.
    """

    def __init__(self, output: str | Path = "detections.json") -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        """Map labels back to COCO category ids (and images to files) and write the file."""
        data = trainer.datamodule if isinstance(trainer.datamodule, LabelledDataModule) else None
        category_ids = data.category_ids if data is not None else None
        names = data.classes if data is not None else None
        files = data.prediction_names() if data is not None else None
        preds = predictions[0] if _nested(predictions) else predictions
        indices = batch_indices[0] if _nested(batch_indices) else batch_indices
        by_image: dict[int | str, list[dict[str, Any]]] = {}
        for batch, batch_idx in zip(preds, indices or [None] * len(preds)):
            for j, det in enumerate(batch):
                key: int | str = files[batch_idx[j]] if files is not None else int(det.get("image_id", -1))
                rows = by_image.setdefault(key, [])
                boxes = det["boxes"].tolist()
                for (x0, y0, x1, y1), label, score in zip(boxes, det["labels"].tolist(), det["scores"].tolist()):
                    row: dict[str, Any] = {"file": key} if files is not None else {"image_id": key}
                    row["category_id"] = category_ids[label - 1] if category_ids else label
                    if files is not None and names:
                        row["category"] = names[label - 1]
                    row["bbox"] = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
                    row["score"] = round(score, 5)
                    rows.append(row)
        by_image = gather_to_rank_zero(trainer, by_image)
        if files is not None:  # the order of the folder, whatever rank predicted what
            by_image = {f: by_image[f] for f in files if f in by_image}
        results = [row for rows in by_image.values() for row in rows]
        if trainer.global_rank != 0:
            return
        write_atomically(self.output, lambda f: f.write(json.dumps(results).encode()))
        where = f"{len(by_image)} files" if files is not None else f"{len(by_image)} images"
        print(f"{len(results)} detections on {where} written to {self.output}")
        thresh = getattr(getattr(pl_module, "roi_heads", None), "score_thresh", None)
        if not results and thresh:  # an empty file is easy to mistake for a broken run
            print(
                f"No region scored above box_score_thresh={thresh}: lower it with "
                "--model.init_args.box_score_thresh (e.g. 0.01) to see the model's best guesses."
            )


def _names(trainer: pl.Trainer) -> tuple[list[str] | None, list[str] | None]:
    """Each predicted sample's name and the class names, or None for either (then indices are written).

    From a :class:`LabelledDataModule`; else from the predict dataset as torchvision's ImageFolder has
    them (``samples``, ``classes``), so the writer serves any Lightning project.
    """
    data = trainer.datamodule
    if isinstance(data, LabelledDataModule):
        return data.prediction_names(), list(data.classes)
    loader = trainer.predict_dataloaders
    dataset = getattr(loader[0] if isinstance(loader, list) else loader, "dataset", None)
    samples, classes = getattr(dataset, "samples", None), getattr(dataset, "classes", None)
    return ([str(s[0]) for s in samples] if samples is not None else None), classes


def _nested(values: Any) -> bool:
    """Whether Lightning gave per-dataloader lists (several predict dataloaders) rather than per-batch ones."""
    return bool(values) and isinstance(values[0], list) and bool(values[0]) and isinstance(values[0][0], list)
