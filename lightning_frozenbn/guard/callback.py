"""FrozenModuleGuard: keep frozen modules in eval mode and prove every epoch that they did not change."""

from __future__ import annotations

import difflib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_frozenbn.errors import GuardConfigError
from lightning_frozenbn.guard.consensus import Consensus
from lightning_frozenbn.guard.discovery import (
    defines_configure_model,
    eval_subtrees,
    find_frozen_modules,
    named_frozen_module,
    under,
    unguarded_frozen,
)
from lightning_frozenbn.guard.eval_mode import EvalForcing
from lightning_frozenbn.guard.finetuning import FinetuningWatch, frozen_again, split_unfrozen
from lightning_frozenbn.guard.gradients import ReleasedGradients
from lightning_frozenbn.guard.ledger import Ledger, fingerprint
from lightning_frozenbn.guard.namespaces import SHARDED_STRATEGIES
from lightning_frozenbn.guard.policy import OnViolation, apply_policy, check_arguments, hints
from lightning_frozenbn.guard.report import eval_overrides, freeze_report, summarise
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

    Memory: the reference copy takes as much memory as the frozen tensors (ResNet-50, freeze_at=2:
    about 1 MB; the whole trunk: about 94 MB).
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
        self._late_warned: set[str] = set()  # frozen mid-run without protect(): warned once each
        self._released: dict[str, int] = {}  # tensor name -> epoch of release
        self._protected: dict[str, int] = {}  # module name -> epochs verified when protect() was called
        self._loaded_checksums: dict[str, list[int]] | None = None
        self._epochs_verified = 0
        self._reapplied_eval = 0
        self._last_verified_step = -1
        self._before_load: dict[str, Tensor] = {}  # the frozen values as built, kept while a checkpoint loads
        self._load_hook: Any = None
        self._trainer: pl.Trainer | None = None
        self._training_started = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ---- what is guarded ---------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.modules is None:
            found = find_frozen_modules(pl_module)
        else:
            found = {name: named_frozen_module(pl_module, name, "modules=...") for name in self.modules}
        for name in self._protected:
            if not any(under(name, n) for n in found):
                found[name] = named_frozen_module(pl_module, name, "protect(...)")
        return found

    def _collect(self, pl_module: pl.LightningModule) -> Ledger:
        self._roots = self._resolve(pl_module)
        return Ledger.collect(pl_module, self._roots, self._released)

    def _force_eval(self, pl_module: nn.Module) -> None:
        """Force the fully guarded subtrees to eval; what leaves the set takes the LightningModule's mode."""
        self._eval.set(eval_subtrees(pl_module, set(self._ledger.names)), mode=pl_module.training)
        self._eval.apply()
        self._eval.install_hooks()

    def _consensus(self, trainer: pl.Trainer) -> Consensus:
        return Consensus(trainer.strategy, trainer.global_rank, trainer.world_size)

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, SHARDED_STRATEGIES):
            raise GuardConfigError(
                f"FrozenModuleGuard does not support {type(strategy).__name__}: it shards parameters across "
                "ranks, so a bit-for-bit copy and a cross-rank comparison of the frozen state would not mean "
                "what they say. Frozen BN needs no synchronisation: use DDP (strategy: ddp), or remove the "
                "FrozenModuleGuard callback for this strategy."
            )
        # fail fast on bad `modules` names, before any work; a name the model does not hold yet may be built by
        # its configure_model (Lightning calls it after setup): checked at on_fit_start then
        present = {name for name, _ in pl_module.named_modules()}
        missing = [n for n in self.modules or [] if n not in present]
        if not (missing and defines_configure_model(pl_module)):
            self._resolve(pl_module)
        self._trainer = trainer
        self._before_load = {}
        self._remove_load_hook()
        # The checkpoint stores checksums, not values. When Lightning loads a checkpoint into the model
        # (a resume), keep the frozen tensors as the model was built just before: if a resumed tensor
        # was tampered with, these are its original values whenever their checksum matches the stored one.
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._keep_values_before_load)
        self._watch.wrap(trainer, self._after_finetuning)

    def _train_released_again(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, parameters released before it train again, as before the interruption (one line)."""
        again = frozen_again(pl_module, self._released, trainer.optimizers)
        for name in again:
            pl_module.get_parameter(name).requires_grad_(True)
        if again:
            rank_zero_info(
                f"FrozenModuleGuard: {len(again)} parameters released before the resume ({summarise(again)}) are in "
                "the optimizer but were frozen again (BaseFinetuning freezes in setup and restores only the "
                "optimizer's groups): requires_grad is switched back on, so they train as before the interruption."
            )

    def _keep_values_before_load(self, module: nn.Module, *args: Any) -> None:
        self._before_load = {name: record.reference for name, record in self._collect(module).records.items()}

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

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
        self._remove_load_hook()
        self._trainer, self._training_started = trainer, True
        self._train_released_again(trainer, pl_module)
        self._ledger = self._collect(pl_module)
        self._force_eval(pl_module)
        problems, unrecoverable = [], []
        if self._loaded_checksums is not None:
            problems, unrecoverable = self._ledger.compare_with_checkpoint(self._loaded_checksums, self._before_load)
        self._before_load = {}
        overrides = eval_overrides(list(trainer.callbacks), self._eval.modules)
        still = {n: m for n, m in self._roots.items() if any(under(t, n) or not n for t in self._ledger.names)}
        stats = sum(isinstance(m, StatsFrozenBatchNorm2d) for m in pl_module.modules())
        args = (self._eval.roots, self._eval.modules, list(self._released), stats, overrides)
        report = freeze_report(len(self._ledger.names), still, *args)
        rank_zero_info(report)
        self._verify(trainer, "the start of training", problems, unrecoverable=unrecoverable)

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
            self._verify(trainer, f"global step {step} (epoch {trainer.current_epoch}, batch {batch_idx})")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reapplied_eval:
            rank_zero_info(
                f"FrozenModuleGuard: something put frozen modules back in train mode; eval mode was "
                f"re-applied {self._reapplied_eval} times this epoch."
            )
        self._verify(trainer, f"epoch {trainer.current_epoch}", epoch_end=True)

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
            self._verify(trainer, when, local_only=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._training_started = False
        self._eval.remove_hooks()
        self._remove_load_hook()
        self._watch.unwrap()
        self._gradients.stop()
        self._before_load = {}

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
        self._loaded_checksums = state_dict.get("reference_checksums")
        self._epochs_verified = state_dict.get("epochs_verified", 0)
        self._released = dict(state_dict.get("released", {}))
        self._protected = dict(state_dict.get("protected", {}))

    # ---- verification: local diff -> agreement -> policy -------------------------------------
    def _verify(
        self,
        trainer: pl.Trainer,
        when: str,
        problems: list[str] | None = None,
        epoch_end: bool = False,
        releasing: frozenset[str] = frozenset(),
        unrecoverable: list[str] | None = None,
        local_only: bool = False,
    ) -> None:
        self._last_verified_step = trainer.global_step
        local = (problems or []) + self._ledger.changes(releasing)
        ranks = self._consensus(trainer).local() if local_only else self._consensus(trainer)
        diverged: list[str] = []
        diverged_trainable: list[str] = []
        trainable: dict[str, Tensor] = {}
        if ranks.world_size > 1 and self.check_ranks:
            ranks.check_same_names(self._ledger.names, "guarded")  # same shapes for the reductions
            diverged = ranks.diverged(self._ledger.names, fingerprint(self._ledger.live()))
            # "every rank trains the same model": the trainable parameters too (buffers of training BN are
            # rank-local between DDP's broadcasts, so they are not compared)
            trainable = {n: p for n, p in trainer.lightning_module.named_parameters() if p.requires_grad}
            ranks.check_same_names(list(trainable), "trainable")
            diverged_trainable = ranks.diverged(list(trainable), fingerprint(list(trainable.values())), "trainable")
        if not local_only:
            self._warn_late_frozen(trainer.lightning_module)
        if ranks.all_agree(not local) and not diverged and not diverged_trainable:
            if epoch_end:
                self._epochs_verified += 1
            ranks_word = f"{'each of' if local_only else 'all'} {trainer.world_size} ranks"
            where = "on rank 0" if trainer.world_size == 1 else f"on {ranks_word}"
            same = f"; its {len(trainable)} trainable parameters the same on every rank" if trainable else ""
            rank_zero_info(
                f"FrozenModuleGuard: {len(self._ledger.names)} frozen tensors bit-identical at {when} {where}{same}."
            )
            return
        reports = ranks.gather_objects((trainer.global_rank, local))
        lines = [f"  rank {r}: {line}" for r, rank_lines in reports for line in rank_lines]
        only_trainable = not lines and not diverged
        what = "the ranks hold different trainable parameters" if only_trainable else "the frozen state changed"
        message = f"FrozenModuleGuard: {what} at {when}:\n" + "\n".join(
            lines + [f"  {d}" for d in diverged + diverged_trainable] + hints(trainer, lines)
        )
        restore_trainable = list(trainable.values()) if diverged_trainable else []
        unrecoverable = unrecoverable or []
        apply_policy(self.on_violation, self._ledger, ranks, message, diverged, unrecoverable, restore_trainable)

    def _warn_late_frozen(self, pl_module: nn.Module) -> None:
        """One warning per module frozen after training started without :meth:`protect` (automatic mode)."""
        if self.modules is not None or not self._training_started:
            return
        late = [
            n
            for n in unguarded_frozen(pl_module, set(self._ledger.names), set(self._released))
            if n not in self._late_warned
        ]
        if late:
            self._late_warned.update(late)
            rank_zero_warn(
                f"FrozenModuleGuard: {', '.join(late[:5])}{' ...' if len(late) > 5 else ''} "
                f"{'was' if len(late) == 1 else 'were'} frozen after training started and "
                f"{'is' if len(late) == 1 else 'are'} not guarded: nothing proves {'it' if len(late) == 1 else 'they'} "
                f"stay unchanged. Call guard.protect({late[0]!r}) right after freezing to guard it from then on."
            )

    # ---- deliberate changes to the guarded set -----------------------------------------------
    def _after_finetuning(self, trainer: pl.Trainer, pl_module: pl.LightningModule, by: str) -> None:
        """Release what a BaseFinetuning callback just unfroze and gave to an optimizer."""
        if self._consensus(trainer).all_agree(not any(p.requires_grad for p in self._ledger.params.values())):
            return  # nothing unfrozen on any rank
        released, held = split_unfrozen(self._ledger, trainer.optimizers)
        for name in held:
            self._ledger.records[name].live.requires_grad_(False)
        if held:
            rank_zero_info(
                f"FrozenModuleGuard: {by} switched requires_grad on for {len(held)} parameters without giving "
                f"them to an optimizer (e.g. BatchNorm with train_bn=False): they stay frozen, guarded and in "
                f"eval mode ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''})."
            )
        self._release(released, by)

    def _release(self, names: list[str], by: str) -> None:
        trainer = self._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if trainer is not None:
            self._consensus(trainer).check_same_names(names, "released")
            if names:  # their requires_grad is on by now, deliberately: check only their values
                self._verify(
                    trainer, f"epoch {epoch}, before {by} released {len(names)} tensors", releasing=frozenset(names)
                )
        if not names:
            return
        self._ledger.release(names)
        self._released.update({name: epoch for name in names})
        if trainer is not None:
            pl_module = trainer.lightning_module
            self._eval.set(eval_subtrees(pl_module, set(self._ledger.names)), mode=pl_module.training)
        rank_zero_info(
            f"FrozenModuleGuard: {by} released {len(names)} tensors at epoch {epoch} ({summarise(names)}); verified "
            f"bit-identical for {self._epochs_verified} epochs up to the release. {len(self._ledger.names)} tensors "
            "stay guarded."
        )

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
        selected: list[str] = []
        for name in names:
            matches = self._ledger.select(name)
            if not matches:
                gone = [e for r, e in self._released.items() if under(r, name)]
                close = difflib.get_close_matches(name, self._ledger.prefixes(), n=3)
                hint = f" It was released at epoch {gone[0]}." if gone else ""
                hint += f" Close matches: {', '.join(close)}." if close else ""
                raise GuardConfigError(
                    f"FrozenModuleGuard.release({name!r}): no guarded tensor is named so or lies under it.{hint} "
                    "Guarded tensors are listed by `guard.frozen_tensor_names` once training has started."
                )
            selected += [m for m in matches if m not in selected]
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
