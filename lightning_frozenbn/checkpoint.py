"""Crash-safe checkpoints: written atomically, read with the safe loader, ``last.ckpt`` always the latest epoch."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_frozenbn.data.contract import LabelledDataModule
from lightning_frozenbn.errors import CheckpointError
from lightning_frozenbn.files import write_atomically

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "ResumableCheckpoint",
    "check_checkpoint_kind",
    "model_config_from",
    "read_record",
    "record_of",
    "saved_model_class",
    "write_record",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, made crash-safe and safe to load.

    Why: Lightning writes a checkpoint straight into its final path, so a run killed during the write
    (pre-emption, OOM killer, a full disk) leaves a truncated ``last.ckpt`` and loses the previous
    one too. Here the bytes go to a temporary file in the same folder, are fsynced, and replace the
    old file with one atomic ``os.replace``: at any instant the path holds a complete checkpoint.

    Loading always uses ``torch.load(weights_only=True)``: a file that needs arbitrary Python objects
    (and could run code while unpickling) is refused, and a truncated file fails with its path and
    the earlier checkpoints next to it. Remote paths (``s3://``...) fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write to ``.<name>.tmp-<pid>`` beside ``path``, fsync, then atomically rename."""
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda f: torch.save(checkpoint, f))
        return None

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read with the safe loader; explain unreadable files and point at earlier checkpoints."""
        if weights_only is False:  # `--weights_only false`: asked for the unsafe loader, and not given it silently
            raise CheckpointError(
                f"weights_only=False is refused for {str(path)!r}: this checkpoint IO loads with the safe loader "
                "only (torch.load(weights_only=True)), and checkpoints written by this package need nothing else. "
                "Drop `--weights_only false`; to load a foreign checkpoint you trust that needs pickled objects, "
                "set `trainer.plugins` to another CheckpointIO."
            )
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. {_earlier(path)}")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"Refused to load checkpoint {str(path)!r}: the safe loader (torch.load(weights_only=True)) "
                "rejected it. It is corrupt, or it holds Python objects whose loading could run code; only "
                f"resume from checkpoints you wrote. {_earlier(path)}"
            ) from err
        except Exception as err:  # torch raises several types for truncated zip archives
            raise CheckpointError(
                f"Cannot read checkpoint {str(path)!r} ({type(err).__name__}: {_first_line(err)}). The file is "
                f"truncated or corrupt. {_earlier(path)}"
            ) from err


def _first_line(err: Exception) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


def _earlier(path: Path) -> str:
    folder = path.parent
    others = (
        sorted(
            (p for p in folder.glob("*.ckpt") if p.resolve() != path.resolve()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        if folder.is_dir()
        else []
    )
    if not others:
        return "No other checkpoint was found beside it."
    return "Resume from an earlier checkpoint instead, e.g. --ckpt_path " + ", ".join(str(p) for p in others[:3]) + "."


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is rewritten after every validation and every ``every_n_train_steps``.

    Why: since Lightning 2.6 ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint
    was written in the same step, so after an epoch that did not improve ``val/acc``, ``last.ckpt``
    is an older epoch and a killed run resumes further back than it should. Every other behaviour
    (best-k by the monitored metric, file names) is ModelCheckpoint's. Its state also records the
    CSV logger version of the run, so that a resumed run appends to the same ``metrics.csv``.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        self._csv_version = csv.version if csv is not None else None

    @override
    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state, and the CSV logger version the run writes (a resume continues it)."""
        return {**super().state_dict(), "csv_version": getattr(self, "_csv_version", None)}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step  # the step whose model the monitored metric measured
        super().on_validation_end(trainer, pl_module)
        self._save_monitored(trainer, on_train_epoch_end=False)
        self._ensure_last(trainer, on_train_epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_monitored(trainer, on_train_epoch_end=True)
        self._ensure_last(trainer, on_train_epoch_end=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """With ``every_n_train_steps``, ``last.ckpt`` is a mid-epoch resume point every N steps.

        ModelCheckpoint defers a monitored save until validation (the metric is not there mid-epoch),
        and ``last`` with it: ``every_n_train_steps`` would then write nothing before the epoch ends,
        and a loader with a state (streaming) could never resume mid-epoch. With a monitored metric, the
        step-interval saves go to ``last.ckpt`` only: ModelCheckpoint would write a top-k file between
        validations under the *last* validation's score (``best-epoch07-acc0.9777.ckpt`` holding a later,
        unvalidated model); the top-k files are written right after each validation instead.
        """
        if self.monitor is None or self._every_n_train_steps < 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every, step = self._every_n_train_steps, trainer.global_step
        # a run stopped by max_steps between two checkpoint steps: its last step is a mid-epoch resume point too
        # (else the epoch-end save would record the cut epoch as finished, and a resume would skip its rest)
        stopped = trainer.max_steps is not None and trainer.max_steps != -1 and step >= trainer.max_steps
        if every >= 1 and (step % every == 0 or stopped):
            self._save_last_if_missing(trainer)

    def _save_monitored(self, trainer: pl.Trainer, on_train_epoch_end: bool) -> None:
        """The top-k save right after a validation, where step-interval saves replaced ModelCheckpoint's own."""
        if (
            self.monitor is None
            or self._every_n_train_steps < 1
            or self._should_save_on_train_epoch_end(trainer) != (on_train_epoch_end)
        ):
            return
        # ModelCheckpoint's skip test without "this step is saved": a step-interval last.ckpt of the epoch's last
        # step was written before this validation, and the validated model must still get its top-k file
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if getattr(self, "_validated_step", None) != trainer.global_step:  # an epoch cut by max_steps: no validation
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        if self.save_last:  # last.ckpt after the validation, with its state, replaces the one written before it
            self._save_last_checkpoint(trainer, candidates)

    def _ensure_last(self, trainer: pl.Trainer, on_train_epoch_end: bool) -> None:
        if self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end:
            self._save_last_if_missing(trainer)

    def _save_last_if_missing(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` for this step unless it is off, skipped, or this step is already saved."""
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# a checkpoint saved outside LightningCLI names no class: its layers tell the two kinds apart
_CLASS_BY_LAYERS = (
    ("roi_heads.", "lightning_frozenbn.detection.FrozenBNDetector"),
    ("classifier.weight", "lightning_frozenbn.classifier.FrozenBNClassifier"),
)


# where checkpoints of earlier versions name a class that has moved since (read through saved_model_class)
MOVED_CLASSES = {"lightning_frozenbn.module.FrozenBNClassifier": "lightning_frozenbn.FrozenBNClassifier"}


def model_config_from(path: str | Path) -> dict[str, Any] | None:
    """The model section a checkpoint's hyperparameters give (LightningCLI's ``--ckpt_path`` reading), or None.

    Lightning 2.6's ``LightningCLI._parse_ckpt_path`` does this with the class path as recorded; here
    a class that has moved since the checkpoint was written (:data:`MOVED_CLASSES`) is named where it
    lives now, so checkpoints of earlier versions keep loading without an import shim in the old module.
    """
    checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return None
    if "_class_path" not in hparams:
        return hparams
    class_path = hparams.pop("_class_path")
    return {"class_path": MOVED_CLASSES.get(class_path, class_path), "dict_kwargs": hparams}


def saved_model_class(checkpoint: dict[str, Any]) -> str | None:
    """The class path of the LightningModule that saved ``checkpoint``, or None when it cannot be told.

    LightningCLI records it in the hyperparameters (``_class_path``); a checkpoint saved by a plain
    Trainer is recognised by its layers (detection heads or a classifier).
    """
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if isinstance(class_path, str):
        return MOVED_CLASSES.get(class_path, class_path)
    keys = checkpoint.get("state_dict") or {}
    return next((path for prefix, path in _CLASS_BY_LAYERS if any(k.startswith(prefix) for k in keys)), None)


def check_checkpoint_kind(saved: str | None, model_class: type, source: str) -> None:
    """Refuse a checkpoint of the other kind of model (a classifier's given to the detector, or back).

    Why here and not at the state dict: Lightning would report two hundred missing and unexpected keys,
    and the CLI would even switch the model to the class the checkpoint names. Unimportable classes
    (a research subclass not installed here) pass: Lightning's own error names them.

    Raises:
        CheckpointError: naming the file, both classes, the command for it and the ``weights`` route.
    """
    family = next((c for c in model_class.__mro__ if "command" in vars(c)), None)
    if saved is None or family is None:
        return
    module, _, name = saved.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return
    if not isinstance(cls, type) or issubclass(cls, family):
        return
    command = getattr(cls, "command", None)
    use = f"Use `{command}` for it, or, to" if command else "To"
    raise CheckpointError(
        f"{source} is a checkpoint of {name}, not of {family.__name__}: this cannot resume or evaluate it. {use} "
        "start from its backbone and head, pass it as `model.init_args.weights` instead of --ckpt_path."
    )


# ---- the checkpoint record: what a checkpoint carries besides the state, written and read side by side --------
def write_record(checkpoint: dict[str, Any], datamodule: Any) -> None:
    """Record the label set and the initial weights beside the state (called by the module's ``on_save_checkpoint``).

    The class names (and detection's category ids) come from the data module's contract
    (:class:`~lightning_frozenbn.data.contract.LabelledDataModule`), so that ``predict`` on another
    machine names classes without the training data. The trained state is in the state dict, so the saved
    hyperparameters say ``weights: None``: ``load_from_checkpoint`` and the CLI's ``--ckpt_path`` rebuild
    the model without reading (or downloading) the initial weights, which an offline node may not have;
    they stay recorded under ``initial_weights``. :func:`read_record` reads all of it back.
    """
    if isinstance(datamodule, LabelledDataModule):
        try:
            names, ids = datamodule.classes, datamodule.category_ids
        except (RuntimeError, ValueError):  # a data module that cannot tell (DataError is a ValueError)
            names, ids = None, None
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            checkpoint["class_names"] = list(names)
        if isinstance(ids, (list, tuple)) and all(isinstance(i, int) for i in ids):
            checkpoint["category_ids"] = list(ids)
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and hparams.get("weights") is not None:
        checkpoint["initial_weights"] = hparams["weights"]
        hparams["weights"] = None


def read_record(path: str | Path | None, must_exist: bool = False) -> dict[str, Any]:
    """The record :func:`write_record` kept beside the state, and the run's place: class path, CSV version, step.

    One memory-mapped read; None for each when there is no checkpoint file ("last" of a new run directory)
    or it predates these entries: the data folders and the config decide then. A local file that cannot
    be read, or is missing while ``must_exist``, raises :class:`CheckpointError` (naming it and the
    checkpoints beside it) before anything of the run is created.
    """
    if not path or not _is_local_file_protocol(path):
        return record_of({})
    if not Path(path).is_file():
        if must_exist:
            AtomicCheckpointIO().load_checkpoint(path)  # raises: does not exist, and which files are there
        return record_of({})
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        AtomicCheckpointIO().load_checkpoint(path)  # raises CheckpointError: truncated, corrupt or unsafe
        return record_of({})  # readable, only not memory-mapped (a legacy non-zip file): nothing recorded to use
    return record_of(checkpoint)


def record_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """:func:`read_record`'s entries from a checkpoint already loaded (None for each it does not hold)."""
    extras: dict[str, Any] = {"csv_version": None}
    names, weights = checkpoint.get("class_names"), checkpoint.get("initial_weights")
    extras["class_names"] = list(names) if isinstance(names, (list, tuple)) else None
    extras["initial_weights"] = weights if isinstance(weights, str) else None
    ids = checkpoint.get("category_ids")
    extras["category_ids"] = [int(i) for i in ids] if isinstance(ids, (list, tuple)) else None
    extras["class_path"] = saved_model_class(checkpoint)
    for key in ("epoch", "global_step"):
        extras[key] = checkpoint.get(key) if isinstance(checkpoint.get(key), int) else None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("ResumableCheckpoint") and isinstance(state, dict):
            version = state.get("csv_version")
            extras["csv_version"] = version if isinstance(version, (int, str)) else None
    return extras
