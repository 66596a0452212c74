"""FrozenModuleGuard: keep frozen modules in eval mode and prove every epoch that they did not change."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_frozenbn.errors import GuardConfigError
from lightning_frozenbn.guard.consensus import Consensus
from lightning_frozenbn.guard.discovery import (
    LateFrozen,
    defines_configure_model,
    eval_subtrees,
    guarded_roots,
    named_frozen_module,
    under,
)
from lightning_frozenbn.guard.eval_mode import EvalForcing
from lightning_frozenbn.guard.finetuning import FinetuningWatch, select_release, split_unfrozen, train_released_again
from lightning_frozenbn.guard.gradients import ReleasedGradients
from lightning_frozenbn.guard.ledger import Ledger
from lightning_frozenbn.guard.policy import OnViolation, check_arguments, refuse_sharded
from lightning_frozenbn.guard.report import (
    eval_overrides,
    freeze_report,
    held_line,
    released_again_line,
    released_line,
)
from lightning_frozenbn.guard.resume import ResumeCheck
from lightning_frozenbn.guard.verification import Verdict, verify
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d

__all__ = ["FrozenModuleGuard"]


class FrozenModuleGuard(Callback):
    r"""Keep frozen modules in eval mode and prove that their tensors stay bit-identical. Any LightningModule.

    ``requires_grad_(False)`` does not stop a BatchNorm from updating its running statistics, any
    ``model.train()`` flips frozen modules back to train mode, and an optimizer given all parameters, a
    bad load or a diverged rank change "frozen" weights silently. This callback finds the frozen modules
    (``modules``, or every maximal submodule whose parameters are all frozen plus every frozen norm
    layer), forces the largest fully frozen subtrees below the LightningModule to eval (forward
    pre-hooks keep their BN/Dropout layers there during fit), and verifies every frozen parameter and
    buffer bit for bit after each training epoch, every ``every_n_train_steps`` and at ``on_fit_end``
    (after every callback's ``on_train_end``), across DDP ranks too; a change is reported with the
    tensor, its max |diff| and the rank, and every rank stops together. What a ``BaseFinetuning``
    callback unfreezes and gives to an optimizer, and what :meth:`release` names, is verified once more
    and released: it trains like the rest. :meth:`protect` guards modules frozen mid-run. The checkpoint
    keeps checksums of the *original* reference, so a resumed run is verified against the first fit.
    Sharded strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup. See ``docs/guard.md``.

    Args:
        modules: names of the submodules to guard (``"backbone.layer1"``); None finds them.
        on_violation: ``"raise"`` stops training (all ranks) with the report, ``"warn"`` logs it and
            goes on, ``"restore"`` copies the reference values back and logs what it restored.
        check_ranks: under DDP, also prove that all ranks hold the same frozen state.
        every_n_train_steps: also verify every this many optimizer steps (0: at epoch ends only), for
            long or endless epochs. Between checks it costs one integer test per batch.

    Memory: the reference copy is as large as the frozen tensors (ResNet-50: 1 MB at freeze_at=2, 94 MB at 5).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        on_violation: OnViolation = "raise",
        check_ranks: bool = True,
        every_n_train_steps: int = 0,
    ) -> None:
        check_arguments(modules, on_violation, every_n_train_steps)
        self.modules = list(modules) if modules is not None else None
        self.on_violation = on_violation
        self.check_ranks = check_ranks
        self.every_n_train_steps = every_n_train_steps
        self._roots: dict[str, nn.Module] = {}  # the frozen modules found (or named)
        self._ledger = Ledger()
        self._eval = EvalForcing()
        self._watch = FinetuningWatch()
        self._gradients = ReleasedGradients()
        self._late = LateFrozen()  # frozen mid-run without protect(): warned once each
        self._released: dict[str, int] = {}  # tensor name -> epoch of release
        self._protected: dict[str, int] = {}  # module name -> epochs verified when protect() was called
        self._resume = ResumeCheck()
        self._epochs_verified = 0
        self._reapplied_eval = 0
        self._last_verified_step = -1
        self._trainer: pl.Trainer | None = None
        self._training_started = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ---- what is guarded ---------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        return guarded_roots(pl_module, self.modules, list(self._protected))

    def _collect(self, pl_module: pl.LightningModule) -> Ledger:
        self._roots = self._resolve(pl_module)
        return Ledger.collect(pl_module, self._roots, self._released)

    def _force_eval(self, pl_module: nn.Module) -> None:
        """Force the fully guarded subtrees to eval; what leaves the set takes the LightningModule's mode."""
        self._eval.set(eval_subtrees(pl_module, set(self._ledger.names)), mode=pl_module.training)
        self._eval.apply()
        self._eval.install_hooks()

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(getattr(trainer, "strategy", None))
        # fail fast on bad `modules` names, before any work; a name the model does not hold yet may be built by
        # its configure_model (Lightning calls it after setup): checked at on_fit_start then
        present = {name for name, _ in pl_module.named_modules()}
        missing = [n for n in self.modules or [] if n not in present]
        if not (missing and defines_configure_model(pl_module)):
            self._resolve(pl_module)
        self._trainer = trainer
        self._resume.attach(pl_module, self._collect)  # a checkpoint loaded next is compared at train start
        self._watch.wrap(trainer, self._after_finetuning)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning warns about modules in eval mode just before on_train_start. The guard puts its
        # modules in eval itself in on_train_start, so leave them in train mode until then. Modules built
        # in configure_model exist by now: a bad name in `modules` is refused here.
        for module in self._resolve(pl_module).values():
            module.train()
        self._gradients.start(trainer.strategy, trainer.world_size)  # the strategy wrapped the model by now

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # released under DDP: average their gradients as DDP's reducer would have (see gradients.py)
        self._gradients.average(pl_module, optimizer, trainer.world_size)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._training_started = True
        again = train_released_again(pl_module, self._released, trainer.optimizers)
        if again:
            rank_zero_info(released_again_line(again))
        self._ledger = self._collect(pl_module)
        self._force_eval(pl_module)
        problems, unrecoverable = self._resume.compare(self._ledger)
        self._resume.detach()
        overrides = eval_overrides(list(trainer.callbacks), self._eval.modules)
        still = {n: m for n, m in self._roots.items() if any(under(t, n) or not n for t in self._ledger.names)}
        stats = sum(isinstance(m, StatsFrozenBatchNorm2d) for m in pl_module.modules())
        args = (self._eval.roots, self._eval.modules, list(self._released), stats, overrides)
        report = freeze_report(len(self._ledger.names), still, *args)
        rank_zero_info(report)
        self._act(trainer, self._check(trainer, problems), "the start of training", unrecoverable=unrecoverable)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reapplied_eval = int(self._eval.apply())

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._reapplied_eval += self._eval.apply()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_verified_step:
            when = f"global step {step} (epoch {trainer.current_epoch}, batch {batch_idx})"
            self._act(trainer, self._check(trainer), when)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reapplied_eval:
            rank_zero_info(
                f"FrozenModuleGuard: something put frozen modules back in train mode; eval mode was "
                f"re-applied {self._reapplied_eval} times this epoch."
            )
        if self._act(trainer, self._check(trainer), f"epoch {trainer.current_epoch}"):
            self._epochs_verified += 1

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last word, after every callback's on_train_end whatever the callback order: Lightning's
        # EMAWeightAveraging copies its average into the model there, which moves frozen tensors by
        # rounding. Always run, even right after an epoch-end check (that one ran before those hooks).
        # Each rank checks its own tensors, with no collective: the ranks agreed at the last epoch end, what
        # moves now is moved locally, and a gloo group used this close to interpreter exit aborted processes
        # (Lightning's ddp_spawn tests, our two-node run) when it was not destroyed first.
        if self._training_started:
            when = f"the end of fit (global step {trainer.global_step}, after every on_train_end)"
            self._act(trainer, self._check(trainer, local_only=True), when, local_only=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._training_started = False
        self._eval.remove_hooks()
        self._resume.detach()
        self._watch.unwrap()
        self._gradients.stop()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_checksums": self._ledger.checksums(),
            "epochs_verified": self._epochs_verified,
            "released": dict(self._released),
            "protected": dict(self._protected),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume.loaded_checksums = state_dict.get("reference_checksums")
        self._epochs_verified = state_dict.get("epochs_verified", 0)
        self._released = dict(state_dict.get("released", {}))
        self._protected = dict(state_dict.get("protected", {}))

    # ---- verification: decided in verification.py, acted on here ------------------------------
    def _check(
        self,
        trainer: pl.Trainer,
        problems: list[str] | None = None,
        releasing: frozenset[str] = frozenset(),
        local_only: bool = False,
    ) -> Verdict:
        self._last_verified_step = trainer.global_step
        args = {"problems": problems, "releasing": releasing, "local_only": local_only}
        verdict = verify(trainer, self._ledger, check_ranks=self.check_ranks, **args)
        if not local_only and self.modules is None and self._training_started:
            self._late.warn(trainer.lightning_module, self._ledger.names, list(self._released))
        return verdict

    def _act(self, trainer: pl.Trainer, verdict: Verdict, when: str, **kwargs: Any) -> bool:
        return verdict.settle(self.on_violation, trainer, self._ledger, when, **kwargs)

    # ---- deliberate changes to the guarded set -----------------------------------------------
    def _after_finetuning(self, trainer: pl.Trainer, pl_module: pl.LightningModule, by: str) -> None:
        """Release what a BaseFinetuning callback just unfroze and gave to an optimizer."""
        if Consensus.of(trainer).all_agree(not any(p.requires_grad for p in self._ledger.params.values())):
            return  # nothing unfrozen on any rank
        released, held = split_unfrozen(self._ledger, trainer.optimizers)
        for name in held:
            self._ledger.records[name].live.requires_grad_(False)
        if held:
            rank_zero_info(held_line(by, held))
        self._release(released, by)

    def _release(self, names: list[str], by: str) -> None:
        trainer = self._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if trainer is not None:
            Consensus.of(trainer).check_same_names(names, "released")
            if names:  # their requires_grad is on by now, deliberately: check only their values
                verdict = self._check(trainer, releasing=frozenset(names))
                self._act(trainer, verdict, f"epoch {epoch}, before {by} released {len(names)} tensors")
        if not names:
            return
        self._ledger.release(names)
        self._released.update({name: epoch for name in names})
        if trainer is not None:
            pl_module = trainer.lightning_module
            self._eval.set(eval_subtrees(pl_module, set(self._ledger.names)), mode=pl_module.training)
        rank_zero_info(released_line(by, names, epoch, self._epochs_verified, len(self._ledger.names)))

    def release(self, *names: str, by: str = "user code") -> list[str]:
        """Stop guarding the tensors under ``names`` (module or tensor names), deliberately.

        Use it where your own code unfreezes part of a frozen model mid-run, right before it does::

            guard.release("backbone.layer4")
            pl_module.backbone.layer4.requires_grad_(True)   # and give them to the optimizer

        The tensors are verified bit-identical one last time (all ranks: call it on every rank, like
        any hook code), then no longer guarded nor kept in eval mode; BN layers among them go back to
        the LightningModule's mode. One info line names them, the epoch and how long they were
        verified. The released set is saved in the checkpoint.

        Returns:
            The released tensor names.

        Raises:
            GuardConfigError: no guarded tensor matches one of ``names``.
        """
        selected = select_release(self._ledger, names, self._released)
        self._release(selected, by)
        return selected

    def protect(self, *names: str) -> list[str]:
        """Start guarding the modules ``names`` (frozen mid-run by your code), with a reference taken now.

        The modules must already be frozen (every parameter ``requires_grad=False``). From now on they
        are kept in eval mode and verified like the rest; a released tensor under them is guarded again.

        Returns:
            The newly guarded tensor names.
        """
        pl_module = self._trainer.lightning_module if self._trainer is not None else None
        if pl_module is None:
            raise GuardConfigError("FrozenModuleGuard.protect() works during fit, once training has started.")
        for name in names:
            named_frozen_module(pl_module, name, "protect(...)")
        for name in names:
            self._protected[name] = self._epochs_verified
            for released in [r for r in self._released if under(r, name)]:
                del self._released[released]
        added = self._ledger.extend(self._collect(pl_module))
        self._force_eval(pl_module)
        rank_zero_info(
            f"FrozenModuleGuard: now guarding {', '.join(names)} ({len(added)} tensors, reference taken at epoch "
            f"{self._trainer.current_epoch})."
        )
        return added

    # ---- what it found -----------------------------------------------------------------------
    @property
    def epochs_verified(self) -> int:
        """How many training epochs have been verified bit-identical (survives resume)."""
        return self._epochs_verified

    @property
    def frozen_tensor_names(self) -> list[str]:
        """Names of the guarded tensors (valid after training started)."""
        return self._ledger.names

    @property
    def released_tensor_names(self) -> list[str]:
        """Names of the tensors released deliberately (by a BaseFinetuning callback or :meth:`release`)."""
        return list(self._released)
