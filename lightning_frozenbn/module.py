"""FrozenBNModule: what every task on the frozen-BN trunk shares (arguments, optimizer, calibration, checkpoints)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_frozenbn.backbone import Norm, build_resnet
from lightning_frozenbn.checkpoint import check_checkpoint_kind, saved_model_class, write_record
from lightning_frozenbn.finite import DeferredFiniteCheck, check_finite_now
from lightning_frozenbn.fold import fold_frozen_batchnorm
from lightning_frozenbn.norm import calibrate_bn
from lightning_frozenbn.seeding import seed_step

__all__ = ["FrozenBNModule", "default_optimizer"]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, lr 0.01 and weight decay 1e-4: the fine-tuning default of the field."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


class FrozenBNModule(pl.LightningModule):
    """What every task on the frozen-BN backbone/head shares; subclass it for a new task.

    Builds ``self.backbone`` (stem..layer3, the C4 map) and ``self.head`` (layer4 + pooling) with
    :func:`build_resnet` and owns the task-independent machinery: parameter groups with
    ``backbone_lr_mult``, optimizer and scheduler from YAML, channels_last and ``torch.compile``,
    ``calibrate_bn`` before training, the finite-loss check, self-contained checkpoints, and per-step
    seeds (:func:`~lightning_frozenbn.seeding.step_seed`: each training batch seeds torch's generators
    from the run's seed, epoch, batch and rank, so a fit resumed with ``--ckpt_path`` draws what the
    uninterrupted fit draws, e.g. the detector's sampled regions). A task adds its
    layers, ``forward``, ``training_step`` (calling :meth:`check_loss_finite`) and evaluation steps, as
    :class:`FrozenBNClassifier` and :class:`~lightning_frozenbn.FrozenBNDetector` do, passing these
    arguments through ``**kwargs`` (jsonargparse reads them from here, so a task lists only its own).

    Args:
        arch: torchvision ResNet name, see :data:`lightning_frozenbn.ARCHS`.
        weights: None, a torchvision weight name ("DEFAULT", "IMAGENET1K_V2", ...) or a local file.
        norm: BN policy: "frozen", "eval", "train" or "sync" (see :func:`build_resnet`).
        freeze_at: detectron2's freeze_at, 0..5; 2 freezes the stem and layer1.
        fold: fold frozen BN into the preceding convolutions (same function, faster, less memory).
        compile: ``torch.compile`` the backbone and head in place (state-dict keys unchanged). Off by
            default: it pays on GPU, rarely on CPU.
        channels_last: run the network in channels_last memory format (faster on tensor-core GPUs).
        backbone_lr_mult: the backbone's learning rate is the optimizer's times this factor
            (e.g. 0.1: a pretrained backbone moves slower than the freshly initialised head).
        calibrate_bn: before training, re-estimate the frozen BN statistics on this many training
            batches (0 = keep the loaded statistics). Use it when the data is far from ImageNet or the
            weights are random. Skipped when resuming: the statistics come from the checkpoint.
        check_finite: stop training with a clear error at the first NaN/inf loss (all ranks). True
            checks every step before the backward pass (the weights stay clean), which reads the loss
            on the host: a device sync per step. "deferred" checks each step's loss at the next step
            (and before any checkpoint is saved) so the GPU queue never drains; the weights then
            already carry the bad step when it stops. False turns the check off.
        optimizer: optimizer factory, set in YAML as ``optimizer: {class_path: torch.optim.AdamW, ...}``.
        scheduler: LR scheduler factory; None means cosine decay to 0 over the whole run, per step.
        scheduler_interval: when a scheduler given in ``scheduler`` steps: "epoch" or "step"
            (OneCycleLR and other per-iteration schedules want "step").
        scheduler_frequency: step the scheduler every this many intervals.
        scheduler_monitor: the logged metric a ReduceLROnPlateau scheduler watches (the classifier's
            default ``val/loss``, the detector's ``val/map``); ignored by other schedulers.
        warmup_steps: linear warmup from 0 over this many steps before the default cosine decay.
        no_decay_norm_bias: no weight decay on biases and normalisation parameters (one-dimensional
            tensors), the fine-tuning convention of timm and detectron2.
        fused_epilogue: with ``fold``, run each block's folded shift, residual add and ReLU in cuDNN's
            convolution epilogue on CUDA (same function; false turns it off; see ``docs/performance.md``).
        head_pool: pooling of layer4's output: "avg" (torchvision, Detectron) or "max" (the person-search heads).
    """

    #: How the model runs, not what it learned. With ``--ckpt_path``, LightningCLI rebuilds the model from
    #: the checkpoint's hyperparameters, which would silently beat the command line; for these settings a
    #: value the command gives (one that differs from the default) is used instead, and the log says so.
    run_settings: ClassVar[frozenset[str]] = frozenset(
        {"fold", "compile", "channels_last", "check_finite", "fused_epilogue"}
    )

    def __init__(
        self,
        arch: str = "resnet50",
        weights: str | None = None,
        norm: Norm = "frozen",
        freeze_at: int = 2,
        fold: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        backbone_lr_mult: float = 1.0,
        calibrate_bn: int = 0,
        check_finite: bool | Literal["deferred"] = True,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_frequency: int = 1,
        scheduler_monitor: str = "val/loss",
        warmup_steps: int = 0,
        no_decay_norm_bias: bool = False,
        head_pool: Literal["avg", "max"] = "avg",
        fused_epilogue: bool = True,
    ) -> None:
        super().__init__()
        # Every __init__ argument of the task's class hierarchy (Lightning walks the calling __init__ frames),
        # so the task subclasses list only their own arguments and pass these through **kwargs.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self._step_seed_base: int | None = None  # see on_train_batch_start; kept in the checkpoint
        self._deferred_finite = DeferredFiniteCheck()  # the last step's check (check_finite="deferred")
        if not backbone_lr_mult >= 0:
            raise ValueError(f"backbone_lr_mult={backbone_lr_mult!r} must be >= 0 (1.0 = same LR as the head).")
        if isinstance(calibrate_bn, bool) or not isinstance(calibrate_bn, int) or calibrate_bn < 0:
            raise ValueError(f"calibrate_bn={calibrate_bn!r} must be a number of batches >= 0 (0 = off).")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r} is invalid: expected 'epoch' or 'step'.")
        for name, value, least in (("scheduler_frequency", scheduler_frequency, 1), ("warmup_steps", warmup_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {least}.")
        if check_finite not in (True, False, "deferred"):
            raise ValueError(
                f"check_finite={check_finite!r} is invalid: expected true (check every step), 'deferred' "
                "(check one step later, no device sync) or false (off)."
            )
        try:  # a bad optimizer setting (lr < 0, momentum > 1, ...) fails here, named, not mid-fit
            optimizer([nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"The optimizer rejects its settings: {err}. Fix `model.init_args.optimizer.init_args` "
                "(for example lr: 0.01)."
            ) from err
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone, self.head = self.build_trunk(arch, weights, norm, freeze_at, fold, head_pool, fused_epilogue)
        self._compiled = False

    def build_trunk(
        self,
        arch: str,
        weights: str | None,
        norm: Norm,
        freeze_at: int,
        fold: bool,
        head_pool: Literal["avg", "max"],
        fused_epilogue: bool,
    ) -> tuple[nn.Module, nn.Module]:
        """The frozen-BN ResNet as ``(backbone, head)`` (:func:`~lightning_frozenbn.backbone.build_resnet`).

        Override where the trunk's weights come from elsewhere (the FPN detector loads a whole
        detector's checkpoint, and folds after loading it).
        """
        return build_resnet(arch, weights, norm, freeze_at, fold, head_pool, fused_epilogue)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only, in a backbone group and a head group (for ``backbone_lr_mult``)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": backbone, "name": "backbone"}, {"params": rest, "name": "head"}]
        if self.hparams.no_decay_norm_bias:
            # biases and norm affine parameters are 1-D: decaying them towards 0 only hurts (timm, detectron2)
            split = []
            for g in groups:
                split.append({"params": [p for p in g["params"] if p.dim() > 1], "name": g["name"]})
                no_decay = [p for p in g["params"] if p.dim() <= 1]
                split.append({"params": no_decay, "name": g["name"] + "_no_decay", "weight_decay": 0.0})
            groups = split
        return [g for g in groups if g["params"]]

    def configure_model(self) -> None:
        """Apply channels_last and torch.compile once, on the target device."""
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            if not torch._dynamo.is_dynamo_supported():
                raise RuntimeError(
                    f"compile=True but torch.compile is not supported here (torch {torch.__version__}). "
                    "Set `model.compile: false`."
                )
            self.backbone.compile()
            self.head.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        """Calibrate frozen BN statistics before the guard takes its reference (``on_train_start``)."""
        if not self.hparams.calibrate_bn:
            return
        if self.trainer.ckpt_path is not None:
            rank_zero_info("calibrate_bn: resuming from a checkpoint, keeping its frozen BN statistics.")
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError("calibrate_bn needs a LightningDataModule passed to `Trainer.fit(datamodule=...)`.")
        # Each rank takes every world_size-th batch, so N batches per rank are N x world_size different
        # batches in all (the loader here is the data module's own, not split by Lightning's sampler).
        # A data module whose training loader has a resumable position (streaming) gives a loader of its own.
        loader = getattr(datamodule, "calibration_dataloader", datamodule.train_dataloader)()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = world > 1 and len(loader) >= world
        # batch_to_device runs the data module's transfer hooks: uint8 batches arrive normalised, as in training
        strategy = self.trainer.strategy
        batches = (strategy.batch_to_device(b)[0] for i, b in enumerate(loader) if not shard or i % world == rank)
        count = calibrate_bn(self, batches, self.hparams.calibrate_bn, reduce=self.trainer.strategy.reduce)
        if self.hparams.fold:
            fold_frozen_batchnorm(self.backbone)
            fold_frozen_batchnorm(self.head)
        rank_zero_info(
            f"calibrate_bn: re-estimated the statistics of {count} frozen BN layers on "
            f"{self.hparams.calibrate_bn} training batches (population mean/variance)."
        )

    def check_loss_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Stop all ranks at the first non-finite loss (``check_finite``); call it from ``training_step``."""
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.check_finite == "deferred":
            self._deferred_finite.queue(loss, self.trainer.world_size, where, self.global_rank)
        elif self.hparams.check_finite:
            check_finite_now(loss, self.trainer.strategy, where, self.global_rank)

    def _check_deferred_finite(self) -> None:
        if self._deferred_finite.pending:  # (no trainer is needed when nothing is pending)
            self._deferred_finite.settle(self.trainer.world_size, self.global_rank)

    def on_train_epoch_end(self) -> None:
        """Check the epoch's last loss (``check_finite="deferred"``)."""
        self._check_deferred_finite()

    def on_train_end(self) -> None:
        """Check the run's last loss (``check_finite="deferred"``)."""
        self._check_deferred_finite()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this step's random draws from (seed, epoch, batch, rank): a resumed fit repeats them exactly."""
        if self._step_seed_base is None:  # the run's seed (seed_everything): nothing reseeds before the first
            self._step_seed_base = torch.initial_seed()  # step; a resumed fit has the checkpoint's
        seed_step(self._step_seed_base, self.current_epoch, batch_idx, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint self-contained; never save weights a not-yet-checked bad step produced.

        The label set and the initial weights are recorded beside the state
        (:func:`~lightning_frozenbn.checkpoint.write_record`), so the checkpoint alone rebuilds the model
        and names its classes, offline and without the training data.
        """
        self._check_deferred_finite()
        if self._step_seed_base is not None:
            checkpoint["step_seed_base"] = self._step_seed_base
        write_record(checkpoint, self.trainer.datamodule if self._trainer is not None else None)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D417
        """Lightning's, but a checkpoint of the other kind of model is refused before one is built from it.

        Why before: the tasks take the shared arguments through ``**kwargs``, so Lightning hands them every
        saved hyperparameter, and a classifier's ``label_smoothing`` would fail the detector's constructor
        with a TypeError instead of the message naming the command for that checkpoint.
        """
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            check_checkpoint_kind(saved_model_class(saved), cls, str(checkpoint_path))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of the other kind of model; say which file and epoch a run resumes from."""
        try:
            trainer = self.trainer
        except RuntimeError:  # load_from_checkpoint: no trainer, nothing resumes
            trainer = None
        source = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "This checkpoint"
        check_checkpoint_kind(saved_model_class(checkpoint), type(self), source)
        if isinstance(checkpoint.get("step_seed_base"), int):
            self._step_seed_base = checkpoint["step_seed_base"]
        if trainer is None:
            return
        if trainer.ckpt_path and trainer.state.fn == "fit":
            rank_zero_info(
                f"Resuming from {trainer.ckpt_path} (saved at epoch {checkpoint.get('epoch')}, "
                f"global step {checkpoint.get('global_step')})."
            )

    def configure_optimizers(self) -> Any:
        """Optimizer over trainable parameters only; backbone LR scaled; cosine per step by default."""
        groups = self.param_groups()
        if not groups:
            raise ValueError(
                "No trainable parameters: everything is frozen. Lower `freeze_at` (5 freezes the whole "
                "trunk, and the classifier should still train) or unfreeze something."
            )
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            if str(group.get("name", "")).startswith("backbone"):
                group["lr"] *= self.hparams.backbone_lr_mult
        hp = self.hparams
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
            config = {"scheduler": scheduler, "interval": hp.scheduler_interval, "frequency": hp.scheduler_frequency}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config["monitor"] = hp.scheduler_monitor
            return {"optimizer": optimizer, "lr_scheduler": config}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total - 1)

        def warmup_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))

        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
