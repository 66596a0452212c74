"""ResumedCSVLogger: a resumed run appends to the metrics.csv of the run it resumes, not to a new version."""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

__all__ = ["ResumedCSVLogger"]


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows logged up to the checkpoint instead of deleting the file.

    Rows logged after the checkpoint (a run killed mid-epoch logged steps it will redo) are dropped, so
    the file reads as one uninterrupted run.
    """

    def __init__(self, log_dir: str, epoch: int, step: int) -> None:
        self._resume_at = (epoch, step)
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        epoch, step = self._resume_at
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _logged_by(r, epoch, step)]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # new rows append under the same header (it grows if new keys come)


def _logged_by(row: dict[str, str], epoch: int, step: int) -> bool:
    """Whether a row was logged before the checkpoint of ``epoch``/``step`` was written."""
    try:
        row_epoch = int(float(row["epoch"])) if row.get("epoch") else epoch
        row_step = int(float(row["step"])) if row.get("step") else step
    except ValueError:
        return True
    return row_epoch <= epoch and row_step <= step


class ResumedCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing into an existing version of a run that is being resumed.

    Why: ``CSVLogger`` starts a new ``version_N`` for every process, so after ``--ckpt_path last`` a
    run's curve is split over two files, and pointing it at the old version deletes that version's
    ``metrics.csv``. This one keeps the rows logged up to the checkpoint (``epoch`` and ``global_step``
    of the checkpoint) and appends the resumed run's rows after them: one file, as if never stopped.
    It overrides a private method of Lightning's CSV writer (``_check_log_dir_exists``), which is why
    pyproject.toml bounds ``lightning`` to the tested minor version.

    Args:
        save_dir, name: as for ``CSVLogger``.
        version: the version folder of the run being resumed.
        epoch, step: the checkpoint's ``epoch`` and ``global_step``.
        **kwargs: passed to ``CSVLogger``.
    """

    def __init__(self, save_dir: str, name: str, version: int | str, epoch: int, step: int, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self._resume_at = (epoch, step)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer that continues the existing ``metrics.csv``."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuedWriter(self.log_dir, *self._resume_at)
        return self._experiment
