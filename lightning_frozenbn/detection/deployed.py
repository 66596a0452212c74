"""DeployedDetector: one image in, its detections out, the detector's own parts as one graph for export."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from lightning_frozenbn.detection.c4 import FrozenBNDetector

__all__ = ["DeployedDetector", "match_detections"]


class DeployedDetector(nn.Module):
    """A detector (from :func:`~lightning_frozenbn.export.deployable`) as ``image -> (boxes, labels, scores)``.

    The detector's own pipeline, call for call: resize and normalise (``transform``), the backbone, the
    RPN, the RoI heads (:meth:`FrozenBNDetector.forward_roi`, so an overridden box head is what is
    exported) and the boxes scaled back to the input's pixels. Two things differ from ``forward``, both
    because a traced graph must keep the image size a tensor: the input is one image, float ``(3, H, W)``
    RGB 0..1 (the exported graph takes any ``H, W``: run it once per image), and images thinner than
    ``max_size`` allows (5000x10 at 256, :func:`~lightning_frozenbn.detection.c4.pad_thin`) are not padded.
    """

    def __init__(self, detector: FrozenBNDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes ``(K, 4)`` xyxy in the input's pixels, labels ``(K,)`` 1..num_classes, scores ``(K,)``."""
        det = self.detector
        size = image.shape[-2:]  # kept symbolic: the exported graph scales its boxes to any input size
        batch, _ = det.transform([image])
        features = det.forward_backbone(batch.tensors)
        features = features if isinstance(features, dict) else OrderedDict([("0", features)])
        proposals, _ = det.rpn(batch, features)
        detections, _ = det.forward_roi(features, proposals, batch.image_sizes)
        (found,) = det.transform.postprocess(detections, batch.image_sizes, [(size[0], size[1])])
        return found["boxes"], found["labels"], found["scores"]


def match_detections(
    got: dict[str, Tensor], expected: dict[str, Tensor], score_thresh: float, rtol: float, atol: float
) -> tuple[float, float] | str:
    """Whether two detectors' outputs on one image agree above ``score_thresh``: max |diff| of boxes and scores.

    The detections scoring at least ``score_thresh`` in ``expected`` must be found in ``got`` with the same
    labels, boxes and scores within ``rtol``/``atol``, and no other (order: label, then score). A
    detection within the tolerance of the threshold may fall on either side of it in the two; it is left
    out of both. Returns the two max differences, or a sentence saying what differs.
    """

    def above(d: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = (d["scores"] - score_thresh).abs() > atol + rtol * score_thresh  # not on the fence
        keep &= d["scores"] >= score_thresh
        d = {k: d[k][keep] for k in ("boxes", "labels", "scores")}
        order = sorted(range(len(d["scores"])), key=lambda i: (int(d["labels"][i]), -float(d["scores"][i])))
        return {k: v[order] for k, v in d.items()}

    got, expected = above(got), above(expected)
    if len(got["scores"]) != len(expected["scores"]):
        n, m = len(got["scores"]), len(expected["scores"])
        return f"{n} detections scoring >= {score_thresh}, the eager model has {m}"
    if not torch.equal(got["labels"].long(), expected["labels"].long()):
        return f"labels {got['labels'].tolist()} differ from the eager model's {expected['labels'].tolist()}"
    diffs = []
    for key in ("boxes", "scores"):
        a, b = got[key].double(), expected[key].double()
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            return f"{key} differ by up to {(a - b).abs().max().item():.3g} (rtol {rtol}, atol {atol})"
        diffs.append((a - b).abs().max().item() if a.numel() else 0.0)
    return diffs[0], diffs[1]
