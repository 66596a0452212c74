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


def test_a_learning_rate_row_logged_at_the_checkpoints_step_is_the_next_epochs(tmp_path):
    """LearningRateMonitor rows have no epoch; the one at the checkpoint's step starts the next epoch (it was
    written after the checkpoint, before a kill) and the resumed run writes it again: keep it once."""
    first = CSVLogger(tmp_path, name="csv")
    first.log_metrics({"lr-SGD": 0.01}, step=0)
    first.log_metrics({"train/loss": 2.0, "epoch": 0}, step=11)
    first.log_metrics({"lr-SGD": 0.0075}, step=12)  # epoch 1 starts: after the checkpoint at (0, 12)
    first.save()
    resumed = RunCSVLogger(tmp_path, "csv", version=0, resume_at=(0, 12))
    resumed.log_metrics({"lr-SGD": 0.0075}, step=12)
    resumed.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    assert [(r["step"], r["lr-SGD"]) for r in rows] == [("0", "0.01"), ("11", ""), ("12", "0.0075")]
