import importlib.util
import subprocess

import pytest
import torch
from helpers import ROOT, python
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_frozenbn.loggers import RunCSVLogger, RunTensorBoardLogger

SCRIPT = ROOT / "scripts" / "plot_metrics.py"
spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
plot_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_metrics)


class Tiny(LightningModule):
    """Logs train/loss every step and val/acc per epoch, as the package's modules do."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean() + 1.0 / (1 + self.current_epoch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.25 * (self.current_epoch + 1) + 0.01 * batch_idx, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_with_both_loggers(root):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=2)
    trainer = Trainer(
        max_epochs=3,
        log_every_n_steps=1,
        logger=[RunCSVLogger(root), RunTensorBoardLogger(root)],
        callbacks=[LearningRateMonitor()],  # more calls at the steps where train and validation rows meet
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), data, data)


def test_tensorboard_logs_give_the_curves_the_csv_gives(tmp_path):
    pytest.importorskip("tensorboard")  # in the dev extra
    fit_with_both_loggers(tmp_path)
    csv_logs = plot_metrics.find_logs(tmp_path / "csv")
    tb_logs = plot_metrics.find_logs(tmp_path / "tensorboard")
    assert csv_logs.name == "metrics.csv" and tb_logs.name == "version_0"
    loss, val, metric = plot_metrics.read_epochs(plot_metrics.read_rows(csv_logs))
    tb_loss, tb_val, tb_metric = plot_metrics.read_epochs(plot_metrics.read_rows(tb_logs))
    assert metric == tb_metric == "val/acc" and sorted(loss) == sorted(val) == [0, 1, 2]
    assert val == pytest.approx({0: 0.275, 1: 0.525, 2: 0.775})  # the epoch means of val/acc
    assert tb_val == pytest.approx(val) and tb_loss == pytest.approx(loss)
    assert loss[0] > loss[1] > loss[2]  # 1 / (1 + epoch) dominates: the right rows went to each epoch


def test_plot_metrics_writes_a_png_from_a_run_directory(tmp_path):
    fit_with_both_loggers(tmp_path / "run")
    result = subprocess.run([python(), str(SCRIPT), str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 epochs of train/loss, 3 of val/acc" in result.stdout
    png = next((tmp_path / "run").rglob("curves.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    bad = subprocess.run(
        [python(), str(SCRIPT), str(tmp_path / "nope.csv")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "nope.csv does not exist" in bad.stderr


def test_a_run_directory_plots_its_training_run_not_a_later_validate(tmp_path):
    fit_with_both_loggers(tmp_path)
    trained = plot_metrics.find_logs(tmp_path)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
    Trainer(
        logger=[RunCSVLogger(tmp_path), RunTensorBoardLogger(tmp_path)],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).validate(Tiny(), data)  # a newer log version with validation rows only
    assert len(list(tmp_path.rglob("metrics.csv"))) == 2
    assert plot_metrics.find_logs(tmp_path) == trained and "version_0" in str(trained)
