"""The ``lightning-frozenbn`` command: LightningCLI with the guard, checkpoints and CSV metrics on by default."""

from __future__ import annotations

import os
import pydoc
import sys
from pathlib import Path
from typing import Any, ClassVar

from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_frozenbn.backbone import eval_resize_for
from lightning_frozenbn.checkpoint import (
    AtomicCheckpointIO,
    ResumableCheckpoint,
    check_checkpoint_kind,
    model_config_from,
    read_record,
    record_of,
)
from lightning_frozenbn.classifier import FrozenBNClassifier
from lightning_frozenbn.data import LabelledDataModule
from lightning_frozenbn.detection import FrozenBNDetector
from lightning_frozenbn.errors import FrozenStateViolation, InputError
from lightning_frozenbn.export import ExportError, ExportMismatch
from lightning_frozenbn.exported import both_named, exported_metadata
from lightning_frozenbn.guard import FrozenModuleGuard
from lightning_frozenbn.loggers import RUN_LOGGERS, RunCSVLogger, default_logger_entries
from lightning_frozenbn.parser import ConciseErrorsParser, init_arguments
from lightning_frozenbn.trainer import ExportingTrainer
from lightning_frozenbn.writers import CocoResultsWriter, PredictionWriter

__all__ = ["DetectionCLI", "FrozenBNCLI", "detect_main", "main"]

# Mistakes in the user's config, data or files (exit 2) and runtime stops (exit 1): one line, no traceback.
USER_ERRORS = (InputError, FileNotFoundError, FrozenStateViolation, FloatingPointError, ExportMismatch)

# The guard's default, made once: jsonargparse's lazy_instance inspects the whole call stack (source lines
# included) to find its caller's module, ~25 ms per call under a deep stack, and every parser asked for one
# per subcommand. The parser only reads its class path (it is never initialised), so one serves every parser.
_GUARD_DEFAULT = lazy_instance(FrozenModuleGuard)


class _CommandsParser(ConciseErrorsParser):
    """The commands' parser: a model class of the other command is refused with that command's name."""

    other_commands: ClassVar[dict[str, str]] = {
        "lightning_frozenbn.FrozenBNDetector": "lightning-frozenbn-detect",
        "lightning_frozenbn.FrozenBNClassifier": "lightning-frozenbn",
    }


class FrozenBNCLI(LightningCLI):
    """LightningCLI for :class:`FrozenBNClassifier` with the frozen-BN defaults wired in.

    * ``num_classes`` flows from the data module into the model (never written twice);
    * ``guard`` (a :class:`FrozenModuleGuard`) is on by default; ``--guard null`` turns it off;
    * ``checkpoint`` (:class:`ResumableCheckpoint`) keeps the best model by ``val/acc`` and a
      ``last.ckpt`` that is always the latest epoch;
    * ``prediction_writer`` writes ``predict`` results to CSV;
    * a LearningRateMonitor, a CSV logger always and a TensorBoard logger when installed, both in the
      run directory (:class:`~lightning_frozenbn.loggers.RunCSVLogger`); they are the defaults of
      ``trainer.logger``, so ``--print_config`` shows them and a config can extend the list;
    * :class:`AtomicCheckpointIO`: checkpoints written atomically and loaded with the safe loader. It is
      the default of ``trainer.plugins`` and is added to a user's plugin list unless that list has its
      own checkpoint IO.

    Devices, precision, strategy and num_nodes are plain Trainer flags, settable in YAML or as
    ``--trainer.<flag>``.
    """

    default_model: type = FrozenBNClassifier
    default_data: type = LabelledDataModule  # folders, chunks, or a user's own data module (the contract)
    task: ClassVar[str] = "classification"  # the data this command trains on (LabelledDataModule.task)
    checkpoint_defaults: dict[str, Any] = {
        "checkpoint.monitor": "val/acc",
        "checkpoint.mode": "max",
        "checkpoint.save_last": True,
        "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
        "checkpoint.auto_insert_metric_name": False,
    }
    prediction_writer: type = PredictionWriter

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", self.default_model)
        kwargs.setdefault("datamodule_class", self.default_data)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["trainer_defaults"] = {
            "callbacks": [LearningRateMonitor(logging_interval="epoch")],
            "logger": default_logger_entries(),
            "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
            **kwargs.get("trainer_defaults", {}),
        }
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", _CommandsParser)
        kwargs.setdefault("trainer_class", ExportingTrainer)  # Lightning's Trainer plus the `export` subcommand
        super().__init__(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's four, and ``export`` (ONNX / torch.export with frozen BN folded, checked on the spot)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link num_classes; default the model class; add the checkpoint, guard and prediction-writer groups."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # `predict --ckpt_path x.ckpt --data...` names no model: the checkpoint's class replaces this default
        parser.set_defaults({"model": {"class_path": f"{self.default_model.__module__}.{self.default_model.__name__}"}})
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults(self.checkpoint_defaults)
        parser.add_argument(
            "--guard",
            type=FrozenModuleGuard | None,
            default=_GUARD_DEFAULT,
            help="The FrozenModuleGuard callback (null to turn it off).",
        )
        parser.add_lightning_class_args(self.prediction_writer, "prediction_writer")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before anything else, and would switch the
        # model to the class the checkpoint names: a classifier checkpoint would turn the detector command
        # into a classifier run. A truncated or unsafe file must fail with our explanation, not a traceback.
        config = self.config.get(str(self.config.get("subcommand")), {})
        path = config.get("ckpt_path")
        if config.get("exported") and path:
            raise ExportError(both_named(config["exported"], path))
        if path == "last":  # Lightning resolves it later; it is where ResumableCheckpoint writes it
            folder = (config.get("checkpoint") or {}).get("dirpath")
            path = Path(_checkpoint_folder(folder, (config.get("trainer") or {}).get("default_root_dir"))) / "last.ckpt"
        # read once, reused before instantiation; a named file that is missing or unreadable is refused now,
        # before the run creates its logger version (`last` on a fresh run directory starts from scratch)
        named = path is not None and config.get("ckpt_path") not in ("last", "best", "hpc")
        self._saved = saved = read_record(path, must_exist=named and not str(path).startswith("registry"))
        if config.get("exported"):  # predict from an exported file: its metadata is the record
            metadata = exported_metadata(config["exported"], self.task)
            self._saved = saved = record_of({k: metadata.get(k) for k in ("class_names", "category_ids")})
        self._saved_in = os.path.realpath(os.path.dirname(os.path.expanduser(str(path)))) if path else None
        check_checkpoint_kind(saved["class_path"], self.model_class, str(config.get("ckpt_path")))
        given = _run_settings_given(config.get("model"), self.model_class)
        try:  # LightningCLI._parse_ckpt_path (Lightning 2.6), with moved class paths mapped
            given_path = config.get("ckpt_path")
            model = model_config_from(given_path) if given_path and Path(given_path).is_file() else None
            if model is not None:
                self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except Exception:
            config = self.config[self.config.subcommand]
            AtomicCheckpointIO().load_checkpoint(config.get("ckpt_path"))  # raises CheckpointError
            raise
        after = self.config.get(str(self.config.get("subcommand")), self.config)  # no subcommand: run=False
        init_args = (after.get("model") or {}).get("init_args")
        for key, value in given.items() if init_args is not None else ():
            if init_args.get(key) != value:
                was = init_args.get(key)
                rank_zero_info(f"Using {key}={value!r} from the command line or config, not the checkpoint's {was!r}")
                init_args[key] = value

    def before_instantiate_classes(self) -> None:
        """Refuse a num_classes written by hand: it comes from the data, and two sources can disagree."""
        config = self.config.get(str(self.subcommand), self.config)
        given = config.get("model", {}).get("init_args", {}).get("num_classes")
        self._checkpoint_num_classes = given if config.get("ckpt_path") else None
        data_args = config.get("data", {}).get("init_args")
        saved = getattr(self, "_saved", None) or read_record(config.get("ckpt_path"))
        data_class = _data_class(config.get("data"))
        if data_class is not None and data_class.task != self.task:
            command = {"classification": "lightning-frozenbn", "detection": "lightning-frozenbn-detect"}[
                data_class.task
            ]
            self.parser.error(
                f"data: {data_class.__name__} holds {data_class.task} data: it is for the `{command}` command, not "
                f"`{self.parser.prog.split()[0]}`. Run `{command} fit --config ...` with this config."
            )
        argument = data_class.label_set_argument if data_class is not None else None
        if data_args is not None and argument in data_args and data_args.get(argument) is None:
            # the checkpoint knows the label set: predicting on new images needs no training data
            data_args[argument] = data_class.label_set_from_record(saved["class_names"], saved["category_ids"])
        model_args = config.get("model", {}).get("init_args", {})
        if data_args is not None and "eval_resize" in data_args and data_args.get("eval_resize") is None:
            # evaluate as the weights were evaluated: IMAGENET1K_V2 wants resize 232 for a 224 crop, not 256
            weights = model_args.get("weights")
            if weights is None:  # restored models say weights: null; the checkpoint records the initial ones
                weights = saved["initial_weights"]
            try:
                resize = eval_resize_for(model_args.get("arch", "resnet50"), weights, data_args.get("image_size", 224))
            except (ValueError, KeyError):
                resize = None  # an unknown name is reported when the model is built
            data_args["eval_resize"] = resize
        if config.get("exported") and model_args.get("weights") is not None:
            model_args["weights"] = None  # the exported file predicts: the model's initial weights are not read
        self._place_loggers(config.get("trainer"), config.get("checkpoint"))
        if given is not None and not config.get("ckpt_path"):
            self.parser.error(
                f"`model.init_args.num_classes: {given}` is set by hand, but it is linked from the data module "
                "(`data.num_classes`, the number of class folders). Remove it from your config or command line."
            )

    def instantiate_classes(self) -> None:
        """Instantiate, turning a bad value in the config into a usage error instead of a traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))  # ConciseErrorsParser.error finds the line that matters

    def after_instantiate_classes(self) -> None:
        """A checkpoint trained on another number of classes than the data has is a clear error."""
        expected = getattr(self, "_checkpoint_num_classes", None)
        if expected is not None and expected != self.datamodule.num_classes:
            where = self.datamodule.source if isinstance(self.datamodule, LabelledDataModule) else "the data module"
            self.parser.error(
                f"The checkpoint was trained with num_classes={expected}, but the data at "
                f"{str(where)!r} has {self.datamodule.num_classes} classes. Use a checkpoint "
                "trained on this data, or point the data at the data it was trained on."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add the guard, and atomic checkpoint writing to a plugin list that brings no checkpoint IO of its own."""
        guard = self._get(self.config_init, "guard")
        config = self._get(self.config_init, "trainer", default={})
        checkpoint = self._get(self.config_init, "checkpoint")
        if checkpoint is not None and checkpoint.dirpath is None:
            checkpoint.dirpath = _checkpoint_folder(None, config.get("default_root_dir"))
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]  # `plugins: [SLURMEnvironment]` keeps it
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is False and checkpoint is not None:
            # a quick run's habit: the command's own checkpoint callback steps aside (Lightning refuses both)
            callbacks = [c for c in callbacks if c is not checkpoint]
            rank_zero_info(
                "trainer.enable_checkpointing is false: no checkpoints are written (no last.ckpt to resume)."
            )
        trainer = self._instantiate_trainer({**config, **kwargs}, callbacks)
        if guard is not None:
            trainer.callbacks.insert(0, guard)
        return trainer

    def _place_loggers(self, trainer: Any, checkpoint: Any) -> None:
        """Put the default loggers (``save_dir: null``) in the run directory; continue the run a fit resumes."""
        if trainer is None or not trainer.get("logger") or trainer.get("logger") is True:
            return
        root = trainer.get("default_root_dir") or "."
        entries = trainer["logger"] if isinstance(trainer["logger"], list) else [trainer["logger"]]
        ours = [e for e in entries if getattr(e, "class_path", None) in RUN_LOGGERS and e.get("init_args")]
        for entry in ours:
            if entry.init_args.get("save_dir") is None:
                entry.init_args.save_dir = root
        resumed = self._resumed_csv(root, checkpoint.get("dirpath") if checkpoint is not None else None)
        csv_entries = [e for e in ours if e.class_path == f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}"]
        if resumed is None or not csv_entries or csv_entries[0].init_args.get("version") is not None:
            return
        version, epoch, step = resumed
        csv_entries[0].init_args.version, csv_entries[0].init_args.resume_at = version, (epoch, step)
        for entry in ours:  # TensorBoard continues the same version, so the two stay side by side
            if entry.init_args.get("version") is None:
                entry.init_args.version = version

    def _resumed_csv(self, root: str, dirpath: str | None) -> tuple[int | str, int, int] | None:
        """(version, epoch, global step) of the CSV metrics a resumed fit continues, if they are here."""
        saved = getattr(self, "_saved", None) or {}
        if self.subcommand != "fit" or saved.get("csv_version") is None or saved.get("global_step") is None:
            return None
        here = Path(CSVLogger(root, name="csv", version=saved["csv_version"]).log_dir)
        in_this_run = getattr(self, "_saved_in", None) == _checkpoint_folder(dirpath, root)
        if not in_this_run or not here.is_dir():
            return None  # a checkpoint of another run directory or machine: its metrics are not here
        return saved["csv_version"], int(saved.get("epoch") or 0), int(saved["global_step"])

    def after_fit(self) -> None:
        """Say where the checkpoints and metrics went."""
        if self.trainer.global_rank != 0:
            return
        ckpt = self.trainer.checkpoint_callback
        lines = []
        if ckpt is not None and ckpt.best_model_path:
            score = ckpt.best_model_score
            lines.append(
                f"best checkpoint: {ckpt.best_model_path} ({ckpt.monitor}={float(score):.4f})"
                if score is not None
                else f"best checkpoint: {ckpt.best_model_path}"
            )
        if ckpt is not None and ckpt.last_model_path:
            lines.append(f"last checkpoint: {ckpt.last_model_path}")
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                lines.append(f"metrics: {Path(logger.log_dir) / 'metrics.csv'}")
            elif where := getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None):
                lines.append(f"logs ({type(logger).__name__}): {where}")  # TensorBoard, W&B, MLflow, yours
        print("\n".join(lines), flush=True)


def _checkpoint_folder(dirpath: str | None, root: str | None) -> str:
    """Where the CLI's checkpoints go: ``checkpoint.dirpath``, else ``<trainer.default_root_dir>/checkpoints``.

    One folder per run directory, not per logger version: `--ckpt_path last` then finds the previous
    run's last.ckpt (Lightning resolves "last" before setup). Absolute and with links resolved, so the
    folder a checkpoint was read from compares equal to it.
    """
    folder = dirpath or os.path.join(os.path.expanduser(str(root or ".")), "checkpoints")
    return os.path.realpath(os.path.expanduser(str(folder)))


def _run_settings_given(model: Any, default_class: type) -> dict[str, Any]:
    """The model's ``run_settings`` the command line or config set to something other than their default."""
    if model is None or model.get("init_args") is None:
        return {}
    cls = pydoc.locate(str(model.get("class_path"))) if model.get("class_path") else default_class
    cls = cls if isinstance(cls, type) else default_class
    defaults = init_arguments(cls)
    return {
        key: model.init_args[key]
        for key in sorted(getattr(cls, "run_settings", ()))
        if key in defaults and key in model.init_args and model.init_args[key] != defaults[key]
    }


def _message(err: Exception) -> str:
    """The error's own message, also when it was raised in a DataLoader worker process.

    PyTorch re-raises a worker's exception as the same type whose message is "Caught X in DataLoader
    worker process N" followed by the whole worker traceback; its last line is the original message.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


class DetectionCLI(FrozenBNCLI):
    """The ``lightning-frozenbn-detect`` command: :class:`FrozenBNDetector` on COCO-format data.

    Everything of :class:`FrozenBNCLI` (guard, atomic checkpoints, loggers, linked num_classes,
    ``--ckpt_path last``), with the detection defaults: checkpoints keep the best ``val/map`` and
    ``predict`` writes a COCO results JSON (:class:`~lightning_frozenbn.CocoResultsWriter`). A second
    command rather than a switch on ``model.class_path`` because these defaults are fixed when the
    parser is built, before any config naming the model is read.
    """

    default_model = FrozenBNDetector
    task = "detection"
    checkpoint_defaults = {
        **FrozenBNCLI.checkpoint_defaults,
        "checkpoint.monitor": "val/map",
        "checkpoint.filename": "best-epoch{epoch:02d}-map{val/map:.4f}",
    }
    prediction_writer = CocoResultsWriter


def _data_class(data: Any) -> type[LabelledDataModule] | None:
    """The data module class a config names, when it implements the contract (else None: nothing is filled in)."""
    path = data.get("class_path") if hasattr(data, "get") else None
    found = pydoc.locate(path) if isinstance(path, str) else None
    return found if isinstance(found, type) and issubclass(found, LabelledDataModule) else None


def _destroy_process_group() -> None:
    """End the run's process group before the interpreter exits, as torch asks.

    Lightning leaves it alive after fit; a gloo group destroyed during interpreter shutdown instead
    sometimes aborts the process ("terminate called without an active exception") after a collective at
    the very end of fit, such as the guard's last check: measured 2 of 6 two-node CPU runs without this.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its end down while another still uses it
        dist.destroy_process_group()


def main(args: list[str] | None = None, cli: type[FrozenBNCLI] = FrozenBNCLI) -> None:
    """Entry point of ``lightning-frozenbn`` and ``python -m lightning_frozenbn``."""
    try:
        cli(args=args)
        _destroy_process_group()
    except USER_ERRORS as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        sys.exit(2 if isinstance(err, (InputError, FileNotFoundError)) else 1)


def detect_main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-frozenbn-detect``."""
    main(args, DetectionCLI)
