"""OncePerImageMAP: torchmetrics' COCO mAP counting each image once, also when DDP pads the evaluation set."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["MAP_KEYS", "OncePerImageMAP"]

# MeanAveragePrecision's scalar results, logged as <stage>/<key>
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class OncePerImageMAP(MeanAveragePrecision):
    """MeanAveragePrecision that counts each image once, by the ``image_id`` the data gives.

    Why: under DDP Lightning's DistributedSampler pads the evaluation set so every rank gets as many
    images (torchmetrics' gather needs that too), and the padded images are repeats: without this,
    validation mAP on 2 ranks differs from the same checkpoint's mAP on one. Images without an id
    (-1) are all kept.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    def update(self, preds: list[dict[str, Tensor]], target: list[dict[str, Tensor]]) -> None:  # noqa: D102
        super().update(preds, target)
        for t in target:  # one tensor per image, as every state of the parent: gathered in the same order
            self.image_ids.append(torch.as_tensor(t.get("image_id", -1), device=self.device).reshape(1))

    def compute(self) -> dict[str, Tensor]:  # noqa: D102
        seen: set[int] = set()
        keep = []
        for i, image_id in enumerate(int(t) for t in self.image_ids):
            if image_id < 0 or image_id not in seen:
                keep.append(i)
                seen.add(image_id)
        if len(keep) < len(self.image_ids):
            for name in self._defaults:
                state = getattr(self, name)
                if isinstance(state, list) and len(state) == len(self.image_ids):
                    setattr(self, name, [state[i] for i in keep])
        return {**super().compute(), "images": torch.tensor(len(keep))}  # how many images the figures cover

    def update_detections(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add a batch: the detector's outputs and the data's targets (only the keys COCO evaluation reads)."""
        truth = [{k: t[k] for k in ("boxes", "labels", "iscrowd", "area", "image_id") if k in t} for t in targets]
        self.update([{k: d[k].float() if k != "labels" else d[k] for k in d} for d in detections], truth)
