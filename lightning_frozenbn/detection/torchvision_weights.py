"""torchvision's Faster R-CNN R50-FPN checkpoints (enum or file) mapped onto this package's names, eps included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor

from lightning_frozenbn.backbone import download_weights, key_mismatch
from lightning_frozenbn.errors import WeightsMismatchError

__all__ = [
    "TORCHVISION_FPN_EPS",
    "is_detection_weights",
    "load_detector_state",
    "read_detection_weights",
    "to_our_keys",
]

# torchvision builds fasterrcnn_resnet50_fpn with FrozenBatchNorm2d and, for its COCO_V1 weights, sets every
# eps to 0.0 (``overwrite_eps``): the weights were trained in a framework (Detectron) whose frozen BN had none.
TORCHVISION_FPN_EPS = 0.0

# torchvision's module names -> this package's (the trunk is backbone = stem..layer3, head = layer4)
_RENAMES = (
    ("backbone.body.layer4.", "head.layer4."),
    ("backbone.body.", "backbone."),
    ("backbone.fpn.", "fpn."),
)
_SUPPORTED = "FasterRCNN_ResNet50_FPN_Weights"  # the v1 layout (v2 has BatchNorm and a 4conv1fc head)


def is_detection_weights(weights: Any) -> bool:
    """Whether ``weights`` names a whole detector's weights: a ``FasterRCNN_*`` enum name or a file of its state."""
    if weights is None:
        return False
    text = str(weights)
    if text.startswith("FasterRCNN_"):
        return True
    path = Path(text)
    if not path.is_file() or path.suffix == ".ckpt":
        return False
    try:
        state = _state_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # unreadable: the trunk reader names the problem
        return False
    return any(k.startswith("backbone.body.") for k in state)


def _state_of(loaded: Any) -> dict[str, Tensor]:
    """The state dict in a file: bare, or under "model" (torchvision's references) or "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return loaded[key]
    return loaded if isinstance(loaded, dict) else {}


def read_detection_weights(weights: str) -> tuple[dict[str, Tensor], str]:
    """The state dict of torchvision's enum name (downloaded as torchvision does) or of a local file, and its source."""
    text = str(weights)
    if text.startswith("FasterRCNN_"):
        enum_name, _, member = text.partition(".")
        if enum_name != _SUPPORTED:
            raise ValueError(
                f"weights={text!r}: only torchvision's {_SUPPORTED} (the fasterrcnn_resnet50_fpn layout: frozen BN, "
                "TwoMLPHead) load into FrozenBNFPNDetector; the v2 model has another head and BatchNorm in the trunk."
            )
        try:
            enum = torchvision.models.get_weight(text)
        except (ValueError, KeyError, AttributeError) as err:
            known = torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").__members__
            members = ", ".join(f"{_SUPPORTED}.{m}" for m in known)
            raise ValueError(f"weights={text!r} is not a torchvision weight: expected one of {members}.") from err
        return download_weights(enum), text
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {text!r} does not exist.")
    return _state_of(torch.load(path, map_location="cpu", weights_only=True)), repr(text)


def to_our_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Torchvision's ``fasterrcnn_resnet50_fpn`` keys renamed to this package's (rpn and roi_heads keep theirs)."""
    out = {}
    for key, value in state.items():
        for theirs, ours in _RENAMES:
            if key.startswith(theirs):
                key = ours + key[len(theirs) :]
                break
        out[key] = value
    return out


def load_detector_state(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> list[str]:
    """Load a mapped detector state into ``model``; returns the box-predictor keys left out (another class count).

    A ``num_classes`` other than the checkpoint's keeps the model's new box predictor, as torchvision's
    fine-tuning tutorial replaces it; every other difference is a :class:`WeightsMismatchError` naming keys.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in expected}
    replaced = [
        k
        for k in state
        if k.startswith("roi_heads.box_predictor.") and k in expected and state[k].shape != expected[k].shape
    ]
    for key in replaced:
        del state[key]
    optional = tuple(replaced) + tuple(k for k in expected if k.endswith("num_batches_tracked"))
    problems = key_mismatch(expected, state, ignore=optional)
    if problems:
        raise WeightsMismatchError(
            f"Weights {source} do not fit this FPN detector: {problems}. Expected torchvision's "
            "fasterrcnn_resnet50_fpn layout (backbone.body.*, backbone.fpn.*, rpn.*, roi_heads.*) and the same `arch`."
        )
    model.load_state_dict(state, strict=False)
    return replaced
