import csv

from lightning.pytorch.loggers import CSVLogger

from lightning_frozenbn.loggers import RunCSVLogger


def test_a_resumed_run_keeps_the_rows_up_to_its_checkpoint_and_appends(tmp_path):
    first = CSVLogger(tmp_path, name="csv")
    # epoch 0 ends at step 11 (its validation row at 11), the checkpoint is written; epoch 1 logs steps 12-13 and dies
    for epoch, step, key in [
        (0, 4, "train/loss"),
        (0, 9, "train/loss"),
        (0, 11, "val/acc"),
        (1, 11, "lr"),
        (1, 13, "train/loss"),
    ]:
        first.log_metrics({key: float(step), "epoch": epoch}, step=step)
    first.save()
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    assert len(list(csv.DictReader(open(path)))) == 5

    resumed = RunCSVLogger(tmp_path, "csv", version=0, resume_at=(0, 11))
    resumed.log_metrics({"lr": 0.5, "epoch": 1}, step=11)
    resumed.log_metrics({"train/loss": 1.5, "val/map": 0.25, "epoch": 1}, step=14)  # a key the file has not seen
    resumed.save()
    rows = list(csv.DictReader(open(path)))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("0", "9"), ("0", "11"), ("1", "11"), ("1", "14")]
    assert rows[2]["val/acc"] == "11.0" and rows[3]["lr"] == "0.5" and rows[4]["val/map"] == "0.25"
    assert not (tmp_path / "csv" / "version_1").exists()
