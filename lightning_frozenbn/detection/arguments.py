"""The detectors' settings checked before anything is built: each refused with the value and what is expected."""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

__all__ = ["CHECKED_ARGUMENTS", "MAP_BACKENDS", "MapBackend", "check_arguments"]

MapBackend = Literal["pycocotools", "faster_coco_eval"]
MAP_BACKENDS: tuple[str, ...] = get_args(MapBackend)  # one source for the CLI and the check


def check_arguments(
    num_classes: Any,
    min_size: Any,
    max_size: Any,
    anchor_sizes: Any,
    aspect_ratios: Any,
    box_positive_fraction: Any,
    map_backend: Any,
    rpn_pre_nms_top_n_train: Any,
    rpn_pre_nms_top_n_test: Any,
    rpn_post_nms_top_n_train: Any,
    rpn_post_nms_top_n_test: Any,
    rpn_batch_size_per_image: Any,
    box_batch_size_per_image: Any,
    roi_output_size: Any,
    box_detections_per_img: Any,
) -> None:
    """The detector's settings, each refused with the value and what is expected."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes={num_classes!r} is invalid: expected the number of object classes (>= 1, "
            "background not counted). With the CLI it is taken from the data module; do not set it twice."
        )
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    counts = {
        "max_size": max_size,
        "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
        "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
        "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
        "rpn_batch_size_per_image": rpn_batch_size_per_image,
        "box_batch_size_per_image": box_batch_size_per_image,
        "roi_output_size": roi_output_size,
        "box_detections_per_img": box_detections_per_img,
        **{f"min_size[{i}]": s for i, s in enumerate(sizes)},
        **{f"anchor_sizes[{i}]": s for i, s in enumerate(anchor_sizes)},
    }
    if not sizes or not list(anchor_sizes) or not list(aspect_ratios):
        raise ValueError("min_size, anchor_sizes and aspect_ratios need at least one value each.")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a positive integer.")
    if not 0 < box_positive_fraction <= 1 or any(not r > 0 for r in aspect_ratios):
        raise ValueError(
            f"box_positive_fraction={box_positive_fraction!r} must be in (0, 1] and aspect_ratios="
            f"{list(aspect_ratios)!r} positive."
        )
    if map_backend not in MAP_BACKENDS:
        raise ValueError(f"map_backend={map_backend!r} is invalid: expected one of {', '.join(MAP_BACKENDS)}.")


CHECKED_ARGUMENTS = frozenset(inspect.signature(check_arguments).parameters)
