"""Compare two prediction files of the same images: eager vs exported (CSV or COCO results JSON), and COCO mAP.

    python scripts/compare_predictions.py eager.csv onnx.csv
    python scripts/compare_predictions.py eager.json onnx.json --truth data/digits_detection/val.json

Prints how many rows agree (same file and class; same image, category and box within the files'
rounding), the largest differences, and for detections the COCO mAP@[.5:.95] and mAP@50 of each file
scored by pycocotools against ``--truth``. Exit 1 when the rows disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys


def compare_csv(a: str, b: str) -> bool:
    rows_a, rows_b = list(csv.DictReader(open(a))), list(csv.DictReader(open(b)))
    same = [(r["file"], r["predicted_class"]) for r in rows_a] == [(r["file"], r["predicted_class"]) for r in rows_b]
    diff = max((abs(float(x["probability"]) - float(y["probability"])) for x, y in zip(rows_a, rows_b)), default=0)
    print(f"{len(rows_a)} vs {len(rows_b)} rows; same files and classes: {same}; max |probability diff| {diff:.3g}")
    return same and len(rows_a) == len(rows_b)


def coco_map(truth: str, results: str) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO(truth)
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def compare_json(a: str, b: str, truth: str | None) -> bool:
    def key(r):
        return (r.get("image_id", r.get("file")), r["category_id"], -r["score"])

    rows_a, rows_b = sorted(json.load(open(a)), key=key), sorted(json.load(open(b)), key=key)
    same = len(rows_a) == len(rows_b) and all(key(x)[:2] == key(y)[:2] for x, y in zip(rows_a, rows_b))
    box = max((abs(p - q) for x, y in zip(rows_a, rows_b) for p, q in zip(x["bbox"], y["bbox"])), default=0)
    score = max((abs(x["score"] - y["score"]) for x, y in zip(rows_a, rows_b)), default=0)
    print(
        f"{len(rows_a)} vs {len(rows_b)} detections; same images and categories: {same}; "
        f"max |bbox diff| {box:.3g} px, max |score diff| {score:.3g} (files round to 0.01 px and 1e-5)"
    )
    if truth:
        for name, path in (("first", a), ("second", b)):
            m, m50 = coco_map(truth, path)
            print(f"COCO mAP of the {name} file ({path}): mAP {m:.4f}, mAP@50 {m50:.4f}")
    return same and box <= 0.011 and score <= 2e-5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--truth", help="COCO annotations of the predicted images (detections: mAP of both files)")
    args = parser.parse_args(argv)
    same = compare_csv(args.first, args.second) if args.first.endswith(".csv") else None
    if same is None:
        same = compare_json(args.first, args.second, args.truth)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
