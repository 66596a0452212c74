import json

import pytest
from helpers import ROOT, finish_early

STUDY = str(ROOT / "scripts" / "study.py")
EARLY = {  # started when the suite starts, beside the other tests (helpers.start_early says why)
    "test_reduced_study_measures_the_three_claims": lambda out: [STUDY, "--quick", "--out", str(out)],
    "test_reduced_detection_study_measures_the_claims_on_the_detector": (
        lambda out: [STUDY, "--task", "detection", "--quick", "--out", str(out)]
    ),
}


@pytest.mark.slow
def test_reduced_study_measures_the_three_claims(request):
    returncode, stderr, tmp_path = finish_early(request, timeout=480)
    assert returncode == 0, stderr[-3000:]
    for name in ("claim1.md", "claim2.md", "claim3.md", "claim1.png", "results.json", "source_resnet18.pth"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    diff = {r["policy"]: r["max_abs_diff"] for r in results["claim2"]}
    # frozen BN: DDP with B/2 per rank computes what one process with B computes (float rounding)
    assert diff["frozen"] < 1e-5
    # train-mode BN normalises with per-rank statistics: clearly different; synchronised BN restores it
    assert diff["train"] > 1000 * diff["frozen"] and diff["sync"] < 1e-5
    # claim 1 at batch 2 (one seed, 60 steps): train-mode BN normalises with 2-image statistics and
    # collapses, frozen BN does not (full study: 0.21 vs 0.98; a quick run here: 0.19 vs 0.80 at 100 steps)
    claim1 = {policy: {int(b): accs[0] for b, accs in runs.items()} for policy, runs in results["claim1"].items()}
    assert claim1["frozen"][2] > 0.5 and claim1["eval"][2] > 0.5, claim1
    assert claim1["train"][2] < claim1["frozen"][2] - 0.3, claim1
    # claim 3 is not shown even by the full study (calibration +0.002, inside the seed spread), so the
    # quick run (source vs calibrated statistics only) asserts only that both fine-tuned on the inverted
    # digits (chance is 0.2)
    assert len(results["claim3"]) == 2 and all(accs[0] > 0.5 for accs in results["claim3"].values()), results["claim3"]


@pytest.mark.slow
def test_reduced_detection_study_measures_the_claims_on_the_detector(request):
    returncode, stderr, tmp_path = finish_early(request, timeout=480)
    assert returncode == 0, stderr[-3000:]
    for name in ("detection.md", "detection.json", "detection.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "detection.json").read_text())
    diff = {r["policy"]: r["max_abs_diff"] for r in results["claim2"]}
    # frozen BN: 2-process DDP equals one process on the union of the batches (float64 rounding); train-mode
    # BN normalises each rank's regions with their own statistics (full study: 8e-17 vs 2e-4)
    assert diff["frozen"] < 1e-12 and diff["train"] > 1e-6, diff
    # calibration: the classifier's statistics on canvases vs re-estimated ones, 400 images at batch 8 (full
    # study, 1200 images: 0.195 vs 0.399 mAP@50 over 3 seeds; this quick run: 0.0953 vs 0.2007, deterministic)
    runs = {r["calibrate_bn"]: r["map_50"] for r in results["claim3"]["runs"]}
    assert runs[4] > runs[0] + 0.1, runs
    # claim 1 does not hold on the detector (train-mode BN is better at every batch size): a smoke run only
    assert {r["policy"] for r in results["claim1"]} == {"frozen", "eval", "train"}
