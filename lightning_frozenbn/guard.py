"""Frozen Module Guard: keep frozen modules in eval mode and prove every epoch that they did not change."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d
from typing_extensions import override

from lightning_frozenbn.norm import StatsFrozenBatchNorm2d

__all__ = ["FrozenModuleGuard", "FrozenStateViolation", "GuardConfigError", "find_frozen_modules", "fingerprint"]

OnViolation = Literal["raise", "warn", "restore"]
# Layers whose forward depends on train/eval mode (FrozenBatchNorm2d's does not, so it needs no hook).
_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a guarded module always runs in eval mode, whoever called ``.train()``."""
    if module.training:
        module.eval()


class GuardConfigError(ValueError):
    """The guard's ``modules`` or ``on_violation`` argument cannot be used with this model."""


class FrozenStateViolation(RuntimeError):
    """A frozen parameter or buffer changed, or ranks disagree on the frozen state."""


def _bits(t: Tensor) -> Tensor:
    """The tensor's raw bits as integers, so that -0.0 != 0.0 and NaN == NaN (same bits)."""
    t = t.detach()
    if t.is_floating_point():
        return t.view(_SAME_SIZE_INT[t.element_size()])
    return t


def fingerprint(tensors: list[Tensor]) -> Tensor:
    """Two int64 checksums per tensor (bit sum and position-weighted bit sum), shape ``(len, 2)``.

    Integer arithmetic wraps deterministically, so the value is the same on every device and rank.
    Any single flipped bit changes the bit sum (by ``2**k``, never a multiple of ``2**64``); the
    weighted sum also catches most swaps of elements. Used for the cross-rank check and the checkpoint.
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.int64)
    rows = []
    for t in tensors:
        bits = _bits(t).reshape(-1).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        rows.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(rows)


def find_frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every maximal submodule whose parameters all have ``requires_grad=False``, plus every FrozenBatchNorm2d."""
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> None:
        params = list(module.parameters())
        if (params and not any(p.requires_grad for p in params)) or isinstance(module, FrozenBatchNorm2d):
            found[name] = module
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


class FrozenModuleGuard(Callback):
    r"""Keep frozen modules in eval mode and prove every epoch that their tensors are bit-identical.

    Works on any LightningModule. ``requires_grad_(False)`` does not stop a BatchNorm from updating its
    running statistics, and any ``model.train()`` flips frozen modules back to train mode; an
    optimizer given all parameters, a bad load or a rank that diverged can also change "frozen"
    weights silently. This callback:

    * finds the frozen modules (``modules`` if given, else every maximal submodule whose parameters
      are all frozen, plus every FrozenBatchNorm2d) and logs a freeze report when training starts;
    * puts them in eval mode at ``on_train_start`` (after Lightning's "modules in eval mode" check, so
      that warning is not raised for them) and again at the start of every epoch and every training
      batch. The start of a training batch is the last point a *callback hook* can act, so during fit
      the guard also installs a forward pre-hook on each frozen module that switches it back to eval
      right before it runs: even a ``self.train()`` inside ``training_step`` cannot put a frozen BN in
      train mode. The hooks are removed at ``teardown``;
    * keeps an exact copy of every frozen parameter and buffer and, after every training epoch,
      checks each bit for bit; under DDP it also checks that all ranks hold the same frozen state.
      A change is reported with the tensor's name, the max abs difference, the number of changed
      elements and the rank. The decision is reduced over ranks, so every rank stops together;
    * stores checksums of the *original* reference in the checkpoint, so a resumed run is verified
      against the state at the start of the first fit, not against whatever it resumed from.

    Args:
        modules: names of the submodules to guard (``"backbone.layer1"``); None finds them.
        on_violation: ``"raise"`` stops training (all ranks) with the report, ``"warn"`` logs it and
            goes on, ``"restore"`` copies the reference values back and logs what it restored.
        check_ranks: under DDP, also prove that all ranks hold the same frozen state.

    Memory: the reference copy takes as much memory as the frozen tensors (for a ResNet-50 with
    freeze_at=2 about 1 MB; the whole trunk, freeze_at=5, about 94 MB).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        on_violation: OnViolation = "raise",
        check_ranks: bool = True,
    ) -> None:
        if on_violation not in ("raise", "warn", "restore"):
            raise GuardConfigError(
                f"FrozenModuleGuard(on_violation={on_violation!r}) is not supported: expected "
                "'raise', 'warn' or 'restore'."
            )
        if modules is not None and (isinstance(modules, str) or not all(isinstance(m, str) for m in modules)):
            raise GuardConfigError(
                f"FrozenModuleGuard(modules={modules!r}): expected a list of submodule names such as "
                "['backbone.conv1', 'backbone.layer1'], or None to find the frozen modules."
            )
        self.modules = list(modules) if modules is not None else None
        self.on_violation = on_violation
        self.check_ranks = check_ranks
        self._frozen: dict[str, nn.Module] = {}
        self._eval_modules: list[nn.Module] = []
        self._tensors: dict[str, Tensor] = {}
        self._frozen_params: dict[str, nn.Parameter] = {}
        self._reference: dict[str, Tensor] = {}
        self._reference_checksums: dict[str, list[int]] = {}
        self._loaded_checksums: dict[str, list[int]] | None = None
        self._epochs_verified = 0
        self._reapplied_eval = 0
        self._hooks: list[Any] = []
        self._before_resume: dict[str, Tensor] = {}
        self._load_hook: Any = None
        self._unrecoverable: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ---- discovery ---------------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.modules is None:
            return find_frozen_modules(pl_module)
        names = [n for n, _ in pl_module.named_modules() if n]
        resolved = {}
        for name in self.modules:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                hint = f" Close matches: {', '.join(close)}." if close else ""
                raise GuardConfigError(
                    f"FrozenModuleGuard(modules=...) names {name!r}, which is not a submodule of "
                    f"{type(pl_module).__name__}.{hint} Use names from `model.named_modules()`, or pass "
                    "modules=None to find the frozen modules automatically."
                )
            module = pl_module.get_submodule(name)
            trainable = [n for n, p in module.named_parameters() if p.requires_grad]
            if trainable:
                raise GuardConfigError(
                    f"FrozenModuleGuard(modules=...) names {name!r}, but it has {len(trainable)} trainable "
                    f"parameters ({', '.join(trainable[:3])}...): the optimizer would change them every "
                    f"step. Freeze it first (`{name}.requires_grad_(False)`) or leave it out of `modules`."
                )
            if not list(module.parameters()) and not list(module.buffers()):
                raise GuardConfigError(
                    f"FrozenModuleGuard(modules=...) names {name!r}, which has no parameters or buffers, so "
                    "there is nothing frozen to guard. Name the module that holds the frozen weights."
                )
            resolved[name] = module
        return resolved

    def _collect(self, pl_module: pl.LightningModule) -> None:
        self._frozen = self._resolve(pl_module)
        self._eval_modules = [m for module in self._frozen.values() for m in module.modules()]
        tensors: dict[str, Tensor] = {}
        params: dict[str, nn.Parameter] = {}
        for name, module in self._frozen.items():
            for key, p in module.named_parameters(prefix=name):
                tensors[key], params[key] = p, p
            for key, b in module.named_buffers(prefix=name):
                tensors[key] = b
        # norm="eval": trainable affine, but the statistics are frozen too.
        for name, module in pl_module.named_modules():
            if isinstance(module, StatsFrozenBatchNorm2d):
                tensors.setdefault(f"{name}.running_mean", module.running_mean)
                tensors.setdefault(f"{name}.running_var", module.running_var)
        self._tensors, self._frozen_params = tensors, params

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._resolve(pl_module)  # fail fast on bad `modules` names, before any work
        self._before_resume = {}
        self._remove_load_hook()
        # The checkpoint stores checksums, not values. When Lightning loads a checkpoint into the model
        # (a resume), keep the frozen tensors as the model was built just before: if a resumed tensor
        # was tampered with, these are its original values whenever their checksum matches the stored one.
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._keep_values_before_load)

    def _keep_values_before_load(self, module: nn.Module, *args: Any) -> None:
        self._collect(module)
        self._before_resume = {name: t.detach().clone() for name, t in self._tensors.items()}

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning warns about modules in eval mode just before on_train_start. The guard puts its
        # modules in eval itself in on_train_start, so leave them in train mode until then.
        for module in self._resolve(pl_module).values():
            module.train()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        self._collect(pl_module)
        self._set_eval()
        self._remove_hooks()
        self._hooks = [
            module.register_forward_pre_hook(_keep_eval)
            for module in self._frozen.values()
            if any(isinstance(m, _MODE_SENSITIVE) for m in module.modules())
        ]
        current = dict(zip(self._tensors, fingerprint(list(self._tensors.values())).tolist()))
        self._reference = {name: t.detach().clone() for name, t in self._tensors.items()}
        problems = self._compare_with_checkpoint(current) if self._loaded_checksums is not None else []
        self._before_resume = {}
        # The checkpoint keeps the checksums of the first fit's reference, even after a violation
        # was reported in "warn"/"restore" mode: later resumes still compare with the original.
        original = self._loaded_checksums or {}
        self._reference_checksums = {n: original.get(n, s) for n, s in current.items()}
        self._log_report(trainer)
        self._verify(trainer, "the start of training", problems)
        self._unrecoverable = []

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reapplied_eval = 0
        self._set_eval()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_eval()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reapplied_eval:
            rank_zero_info(
                f"FrozenModuleGuard: something put frozen modules back in train mode; eval mode was "
                f"re-applied {self._reapplied_eval} times this epoch."
            )
        self._verify(trainer, f"epoch {trainer.current_epoch}", epoch_end=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._remove_load_hook()
        self._before_resume = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference_checksums": self._reference_checksums, "epochs_verified": self._epochs_verified}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_checksums = state_dict.get("reference_checksums")
        self._epochs_verified = state_dict.get("epochs_verified", 0)

    # ---- internals ---------------------------------------------------------------------------
    @property
    def epochs_verified(self) -> int:
        """How many training epochs have been verified bit-identical (survives resume)."""
        return self._epochs_verified

    @property
    def frozen_tensor_names(self) -> list[str]:
        """Names of the guarded tensors (valid after training started)."""
        return list(self._tensors)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _set_eval(self) -> None:
        flipped = False
        for module in self._eval_modules:
            if module.training:
                module.training = False
                flipped = True
        self._reapplied_eval += flipped

    def _compare_with_checkpoint(self, current: dict[str, list[int]]) -> list[str]:
        """Compare the resumed frozen tensors with the checksums of the first fit's reference.

        A tensor that differs gets its original values back as the reference when the model as built
        before the checkpoint was loaded still holds them (same checksum): then the usual comparison
        reports it element by element and ``restore`` really restores it. Otherwise the original values
        exist nowhere (the checkpoint keeps checksums, not values): that is reported, and ``restore``
        refuses to pretend.
        """
        loaded = self._loaded_checksums or {}
        problems = [
            f"{n}: in the checkpoint's frozen reference but no longer frozen" for n in loaded if n not in current
        ]
        self._unrecoverable = []
        for name, sums in current.items():
            if name not in loaded or list(sums) == list(loaded[name]):
                continue
            built = self._before_resume.get(name)
            if built is not None and fingerprint([built])[0].tolist() == list(loaded[name]):
                self._reference[name] = built.to(self._reference[name].device)
                continue
            self._unrecoverable.append(name)
            problems.append(
                f"{name}: differs from the original frozen reference stored in the checkpoint (checksum); the "
                "checkpoint keeps checksums, not values, and the model as built before loading it does not hold "
                "the original values either, so they cannot be restored"
            )
        return problems

    def _local_changes(self) -> list[str]:
        lines = []
        for name, live in self._tensors.items():
            ref = self._reference[name]
            if live.shape != ref.shape or live.dtype != ref.dtype:
                lines.append(
                    f"{name}: shape/dtype changed {tuple(ref.shape)} {ref.dtype} -> {tuple(live.shape)} {live.dtype}"
                )
            elif not torch.equal(_bits(live), _bits(ref)):
                mask = _bits(live) != _bits(ref)  # elements that changed: an unchanged NaN is not a diff
                changed = mask.sum().item()
                diff = (
                    (live.detach()[mask].double() - ref[mask].double()).abs().nan_to_num(nan=float("inf")).max().item()
                )
                lines.append(f"{name}: {changed} of {ref.numel()} elements changed, max |diff| = {diff:.3g}")
        lines += [
            f"{name}: requires_grad was switched back on" for name, p in self._frozen_params.items() if p.requires_grad
        ]
        return lines

    def _verify(
        self, trainer: pl.Trainer, when: str, problems: list[str] | None = None, epoch_end: bool = False
    ) -> None:
        local = (problems or []) + self._local_changes()
        rank, world = trainer.global_rank, trainer.world_size
        diverged: list[str] = []
        if world > 1 and self.check_ranks:
            device = next(iter(self._tensors.values())).device if self._tensors else torch.device("cpu")
            mine = fingerprint(list(self._tensors.values())).to(device)
            gathered = trainer.strategy.all_gather(mine)
            names = list(self._tensors)
            for r in range(1, world):
                rows = (gathered[r] != gathered[0]).any(dim=-1).nonzero().flatten().tolist()
                if rows:
                    shown = ", ".join(names[i] for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
                    diverged.append(
                        f"rank {r} holds a different frozen state than rank 0 in {len(rows)} tensors: {shown}"
                    )
        if trainer.strategy.reduce_boolean_decision(not local, all=True) and not diverged:
            if epoch_end:
                self._epochs_verified += 1
            ranks = f"on all {world} ranks" if world > 1 else "on rank 0"
            rank_zero_info(f"FrozenModuleGuard: {len(self._tensors)} frozen tensors bit-identical at {when} {ranks}.")
            return
        reports: list[tuple[int, list[str]]] = [(rank, local)]
        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered_reports: list[Any] = [None] * world
            dist.all_gather_object(gathered_reports, (rank, local))
            reports = gathered_reports
        lines = [f"  rank {r}: {line}" for r, rank_lines in reports for line in rank_lines] + [
            f"  {d}" for d in diverged
        ]
        message = f"FrozenModuleGuard: the frozen state changed at {when}:\n" + "\n".join(lines)
        if self.on_violation == "raise":
            raise FrozenStateViolation(
                message + "\nFrozen tensors must stay bit-identical. Fix the code that changed them, or pass "
                "FrozenModuleGuard(on_violation='restore') to put the reference values back."
            )
        if self.on_violation == "warn":
            rank_zero_warn(message)
            return
        if not trainer.strategy.reduce_boolean_decision(not self._unrecoverable, all=True):
            raise FrozenStateViolation(
                message + "\non_violation='restore' cannot restore values that no longer exist. Resume from a "
                "checkpoint whose frozen tensors are intact, or build the model from the weights the first fit "
                "started from, so that the guard can restore them."
            )
        self._restore(diverged)
        rank_zero_warn(message + "\nRestored the reference values of these tensors.")

    def _restore(self, diverged: list[str]) -> None:
        with torch.no_grad():
            for name, live in self._tensors.items():
                live.copy_(self._reference[name])
            for p in self._frozen_params.values():
                p.requires_grad_(False)
            if diverged and dist.is_available() and dist.is_initialized():
                for name, live in self._tensors.items():
                    dist.broadcast(live, src=0)
                    self._reference[name].copy_(live)

    def _log_report(self, trainer: pl.Trainer) -> None:
        rows = []
        for name, module in self._frozen.items():
            n_params = sum(p.numel() for p in module.parameters())
            n_buffers = sum(b.numel() for b in module.buffers())
            mode = "eval" if not module.training else "train"
            rows.append(
                f"  {name or '<root>':<32} {type(module).__name__:<24} {n_params:>11,} {n_buffers:>10,}  {mode}"
            )
        stats_frozen = sum(isinstance(m, StatsFrozenBatchNorm2d) for m in trainer.lightning_module.modules())
        extra = (
            f"\n  + running stats of {stats_frozen} StatsFrozenBatchNorm2d layers (norm='eval')" if stats_frozen else ""
        )
        rank_zero_info(
            f"FrozenModuleGuard: guarding {len(self._tensors)} frozen tensors in {len(self._frozen)} modules; "
            f"put them in eval mode at train start (Lightning's eval-mode warning does not apply to these).\n"
            f"  {'module':<32} {'type':<24} {'params':>11} {'buffers':>10}  mode\n" + "\n".join(rows) + extra
        )
