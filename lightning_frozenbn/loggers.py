"""The CLI's default loggers: they follow ``trainer.default_root_dir``, and a resumed fit appends to its run."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

__all__ = ["RUN_LOGGERS", "RunCSVLogger", "RunTensorBoardLogger", "default_logger_entries"]


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
    """Whether a row was logged before the checkpoint of ``epoch``/``step`` was written.

    A row without an epoch (LearningRateMonitor logs straight to the logger) at the checkpoint's own step
    was logged after it: the monitor logs an epoch's or a step's rate before that epoch's or step's first
    update, i.e. after the checkpoint that ends at that step.
    """
    try:
        row_epoch = int(float(row["epoch"])) if row.get("epoch") else None
        row_step = int(float(row["step"])) if row.get("step") else step
    except ValueError:
        return True
    if row_epoch is None:
        return row_step < step
    return row_epoch <= epoch and row_step <= step


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose folder defaults to the run directory, and which can continue a run.

    Why: the CLI's default loggers are written in its defaults, so ``--print_config`` shows them and a
    user can extend the list (add W&B) instead of unknowingly replacing it. The defaults are fixed
    before the config is read, so the folder cannot be spelled there: ``save_dir: null`` means
    ``trainer.default_root_dir`` (the CLI fills it in; "." outside the CLI).

    Lightning's ``CSVLogger`` starts a new ``version_N`` for every process, so after ``--ckpt_path last``
    a run's curve would be split over two files, and pointing it at the old version deletes that
    version's ``metrics.csv``. With ``resume_at`` (set by the CLI when a fit resumes a checkpoint of
    this run directory), this logger keeps the rows logged up to the checkpoint and appends the resumed
    run's rows after them: one file, as if never stopped. It overrides a private method of Lightning's
    CSV writer (``_check_log_dir_exists``), which is why pyproject.toml bounds ``lightning``.

    Args:
        save_dir: parent folder of ``name``; None = the run directory.
        name: sub-folder holding the ``version_N`` folders.
        version: the version folder; None = the next free one.
        resume_at: ``(epoch, global_step)`` of the checkpoint a resumed run starts from; requires ``version``.
        **kwargs: passed to ``CSVLogger`` (``prefix``, ``flush_logs_every_n_steps``).
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "csv",
        version: int | str | None = None,
        resume_at: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if resume_at is not None and version is None:
            raise ValueError(
                f"RunCSVLogger(resume_at={resume_at}) needs the version folder to continue: pass version= too."
            )
        super().__init__(os.fspath(save_dir) if save_dir is not None else ".", name=name, version=version, **kwargs)
        self._resume_at = tuple(resume_at) if resume_at is not None else None

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """Lightning's writer, or on a resumed run the writer that continues the existing ``metrics.csv``."""
        if self._experiment is not None or self._resume_at is None:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuedWriter(self.log_dir, *self._resume_at)
        return self._experiment


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger whose folder defaults to the run directory (see :class:`RunCSVLogger`).

    Args:
        save_dir: parent folder of ``name``; None = the run directory.
        name: sub-folder holding the ``version_N`` folders.
        version: the version folder; None = the next free one (the CLI passes the CSV logger's on resume).
        **kwargs: passed to ``TensorBoardLogger``.
    """

    def __init__(
        self, save_dir: str | None = None, name: str = "tensorboard", version: int | str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(os.fspath(save_dir) if save_dir is not None else ".", name=name, version=version, **kwargs)


RUN_LOGGERS = {f"{c.__module__}.{c.__name__}" for c in (RunCSVLogger, RunTensorBoardLogger)}


def default_logger_entries() -> list[dict[str, str]]:
    """CSV always, TensorBoard when installed (decided when the parser is built, so the defaults say it)."""
    loggers = [{"class_path": f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}"}]
    for package in ("tensorboard", "tensorboardX"):  # what Lightning's TensorBoardLogger can write with
        try:
            __import__(package)
        except ImportError:
            continue
        loggers.append({"class_path": f"{RunTensorBoardLogger.__module__}.{RunTensorBoardLogger.__name__}"})
        break
    return loggers
