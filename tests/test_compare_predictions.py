"""scripts/compare_predictions.py: the eager-vs-exported comparison the deployment figures come from."""

from __future__ import annotations

import json

import pytest
from compare_predictions import main


def _run(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_equal_files_pass_and_a_changed_class_or_box_fails(tmp_path, capsys):
    rows = "file,predicted_class,probability\na.png,3,0.900000\nb.png,7,0.800000\n"
    (tmp_path / "a.csv").write_text(rows)
    (tmp_path / "b.csv").write_text(rows.replace("0.800000", "0.800002"))
    (tmp_path / "c.csv").write_text(rows.replace("b.png,7", "b.png,1"))
    assert _run(tmp_path / "a.csv", tmp_path / "b.csv") == 0
    assert "max |probability diff| 2e-06" in capsys.readouterr().out
    assert _run(tmp_path / "a.csv", tmp_path / "c.csv") == 1
    dets = [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 12.0], "score": 0.9}]
    (tmp_path / "a.json").write_text(json.dumps(dets))
    (tmp_path / "b.json").write_text(json.dumps([{**dets[0], "bbox": [1.01, 2.0, 10.0, 12.0]}]))  # the file's rounding
    (tmp_path / "c.json").write_text(json.dumps([{**dets[0], "bbox": [1.5, 2.0, 10.0, 12.0]}]))
    assert _run(tmp_path / "a.json", tmp_path / "b.json") == 0
    assert _run(tmp_path / "a.json", tmp_path / "c.json") == 1
    assert "max |bbox diff| 0.5 px" in capsys.readouterr().out


def test_the_coco_map_of_each_file_is_scored_against_the_truth(tmp_path, capsys):
    truth = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "1.png"}],
        "categories": [{"id": 2, "name": "two"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0}],
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    hit = [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 12.0], "score": 0.9}]
    (tmp_path / "a.json").write_text(json.dumps(hit))
    (tmp_path / "b.json").write_text(json.dumps(hit))
    assert _run(tmp_path / "a.json", tmp_path / "b.json", "--truth", tmp_path / "truth.json") == 0
    out = capsys.readouterr().out
    assert "COCO mAP of the first file" in out and out.count("mAP 1.0000, mAP@50 1.0000") == 2
