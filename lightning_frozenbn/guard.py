"""Frozen Module Guard: keep frozen modules in eval mode and prove every epoch that they did not change."""

from __future__ import annotations

import difflib
import zlib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d
from typing_extensions import override

from lightning_frozenbn.norm import StatsFrozenBatchNorm2d

__all__ = [
    "FrozenModuleGuard",
    "FrozenStateViolation",
    "GuardConfigError",
    "eval_subtrees",
    "find_frozen_modules",
    "fingerprint",
    "is_frozen_norm",
]

OnViolation = Literal["raise", "warn", "restore"]
# Layers whose forward depends on train/eval mode (FrozenBatchNorm2d's does not, so it needs no hook).
_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on a guarded BN/Dropout layer: it always runs in eval mode, whoever called ``.train()``."""
    if module.training:
        module.training = False


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


def is_frozen_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen normalisation layer, recognised by what it is rather than by one class.

    The rule: torchvision's ``FrozenBatchNorm2d`` (and subclasses), or any module that is not a torch
    ``_BatchNorm``, holds ``running_mean`` and ``running_var`` buffers of its own, and has no parameter
    that requires grad. That covers timm's ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``, detectron2's
    ``FrozenBatchNorm2d`` and a user's own (statistics and affine map kept as buffers). A torch BatchNorm
    whose affine parameters are frozen is found by the frozen-submodule rule instead; one with
    ``affine=False`` and no frozen marker is a BN that trains its statistics, so it is left alone.
    """
    if isinstance(module, FrozenBatchNorm2d):
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if buffers.get("running_mean") is None or buffers.get("running_var") is None:
        return False
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def find_frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every maximal submodule whose parameters all have ``requires_grad=False``, plus every frozen norm layer.

    Frozen norm layers are those :func:`is_frozen_norm` recognises (torchvision's, timm's, detectron2's
    or a user's own frozen BN), inside trainable modules too.
    """
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> None:
        params = list(module.parameters())
        if (params and not any(p.requires_grad for p in params)) or is_frozen_norm(module):
            found[name] = module
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def eval_subtrees(model: nn.Module, guarded: set[str]) -> dict[str, nn.Module]:
    """The largest subtrees below ``model`` whose every tensor is in ``guarded`` (and that hold at least one).

    These are what "frozen" means for train/eval mode: every module inside them (Dropout, ReLU and
    containers too) runs in eval. The root itself is never one (the LightningModule follows the
    Trainer), nor is a module with a trainable or released tensor anywhere below it, nor a module that
    holds no tensor at all outside such a subtree (a Dropout beside trainable layers follows its parent).
    """
    fully: dict[str, bool] = {}

    def visit(module: nn.Module, name: str) -> tuple[bool, bool]:
        own = [k for k, t in module.named_parameters(recurse=False)] + [
            k for k, t in module.named_buffers(recurse=False) if t is not None
        ]
        holds = bool(own)
        inside = all((f"{name}.{k}" if name else k) in guarded for k in own)
        for child_name, child in module.named_children():
            child_holds, child_inside = visit(child, f"{name}.{child_name}" if name else child_name)
            holds, inside = holds or child_holds, inside and child_inside
        fully[name] = holds and inside
        return holds, inside

    visit(model, "")
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and fully.get(name) and not any(_under(name, f) for f in found):
            found[name] = module
    return found


class FrozenModuleGuard(Callback):
    r"""Keep frozen modules in eval mode and prove that their tensors stay bit-identical.

    Works on any LightningModule. ``requires_grad_(False)`` does not stop a BatchNorm from updating its
    running statistics, and any ``model.train()`` flips frozen modules back to train mode; an
    optimizer given all parameters, a bad load or a rank that diverged can also change "frozen"
    weights silently. This callback:

    * finds the frozen modules (``modules`` if given, else every maximal submodule whose parameters
      are all frozen, plus every frozen norm layer, see :func:`is_frozen_norm`) and logs a freeze
      report when training starts;
    * puts the largest fully frozen subtrees below the LightningModule in eval mode (Dropout and
      containers inside them too; never the LightningModule itself, nor a module with a trainable
      part, see :func:`eval_subtrees`) at ``on_train_start`` (after Lightning's "modules in eval mode" check, so
      that warning is not raised for them) and again at the start of every epoch and every training
      batch. The start of a training batch is the last point a *callback hook* can act, so during fit
      the guard also installs a forward pre-hook on each frozen BN/Dropout layer that switches it back
      to eval right before it runs: even a ``self.train()`` inside ``training_step`` cannot put a frozen
      BN in train mode. The hooks are removed at ``teardown``;
    * keeps an exact copy of every frozen parameter and buffer and checks each bit for bit after every
      training epoch, every ``every_n_train_steps`` steps if set, and at ``on_fit_end``, after every callback's
      ``on_train_end`` (Lightning's ``EMAWeightAveraging`` copies its average in there); under DDP it
      also checks that all ranks hold the same frozen state. A change is reported with the tensor's
      name, the max abs difference, the number of changed elements and the rank. The decision is
      reduced over ranks, so every rank stops together;
    * lets tensors go deliberately: when a ``BaseFinetuning`` callback (``BackboneFinetuning`` or a
      subclass) unfreezes modules and gives their parameters to the optimizer, or when user code calls
      :meth:`release`, they are verified one last time and then no longer guarded; every module that
      is no longer inside a fully frozen subtree (the released layers and the Dropout, ReLU and
      containers around them) takes the LightningModule's mode again and loses its eval hook.
      :meth:`protect` does the reverse for modules frozen mid-run. A ``requires_grad`` switched on by
      anything else is a violation;
    * stores checksums of the *original* reference (and the released and protected sets) in the
      checkpoint, so a resumed run is verified against the state at the start of the first fit.

    Sharded strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup: each rank holds only
    shards of the parameters there, so neither the bit-for-bit copy nor the cross-rank comparison means
    what it says. Frozen BN needs no synchronisation, so DDP is the strategy for this recipe.

    Args:
        modules: names of the submodules to guard (``"backbone.layer1"``); None finds them.
        on_violation: ``"raise"`` stops training (all ranks) with the report, ``"warn"`` logs it and
            goes on, ``"restore"`` copies the reference values back and logs what it restored.
        check_ranks: under DDP, also prove that all ranks hold the same frozen state.
        every_n_train_steps: also verify every this many optimizer steps (0: at epoch ends only). For
            long or endless epochs (streaming data, ``max_epochs=-1``). Between checks it costs one
            integer test per batch.

    Memory: the reference copy takes as much memory as the frozen tensors (for a ResNet-50 with
    freeze_at=2 about 1 MB; the whole trunk, freeze_at=5, about 94 MB).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        on_violation: OnViolation = "raise",
        check_ranks: bool = True,
        every_n_train_steps: int = 0,
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
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise GuardConfigError(
                f"FrozenModuleGuard(every_n_train_steps={every_n_train_steps!r}): expected an integer >= 0 "
                "(0 = verify at the end of every epoch only)."
            )
        self.modules = list(modules) if modules is not None else None
        self.on_violation = on_violation
        self.check_ranks = check_ranks
        self.every_n_train_steps = every_n_train_steps
        self._frozen: dict[str, nn.Module] = {}
        self._eval_roots: dict[str, nn.Module] = {}  # the largest fully guarded subtrees: forced to eval
        self._eval_modules: list[nn.Module] = []
        self._tensors: dict[str, Tensor] = {}
        self._frozen_params: dict[str, nn.Parameter] = {}
        self._owners: dict[str, nn.Module] = {}
        self._reference: dict[str, Tensor] = {}
        self._reference_checksums: dict[str, list[int]] = {}
        self._loaded_checksums: dict[str, list[int]] | None = None
        self._released: dict[str, int] = {}  # tensor name -> epoch of release
        self._protected: dict[str, int] = {}  # module name -> epochs verified when protect() was called
        self._epochs_verified = 0
        self._reapplied_eval = 0
        self._last_verified_step = -1
        self._hooks: dict[nn.Module, Any] = {}
        self._before_resume: dict[str, Tensor] = {}
        self._load_hook: Any = None
        self._unrecoverable: list[str] = []
        self._trainer: pl.Trainer | None = None
        self._wrapped: list[BaseFinetuning] = []
        self._releasing: set[str] = set()
        self._training_started = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ---- discovery ---------------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.modules is None:
            found = find_frozen_modules(pl_module)
        else:
            found = {name: self._named_frozen_module(pl_module, name, "modules=...") for name in self.modules}
        for name in self._protected:
            if not any(_under(name, n) for n in found):
                found[name] = self._named_frozen_module(pl_module, name, "protect(...)")
        return found

    @staticmethod
    def _named_frozen_module(pl_module: nn.Module, name: str, where: str) -> nn.Module:
        names = [n for n, _ in pl_module.named_modules() if n]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise GuardConfigError(
                f"FrozenModuleGuard({where}) names {name!r}, which is not a submodule of "
                f"{type(pl_module).__name__}.{hint} Use names from `model.named_modules()`, or pass "
                "modules=None to find the frozen modules automatically."
            )
        module = pl_module.get_submodule(name)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise GuardConfigError(
                f"FrozenModuleGuard({where}) names {name!r}, but it has {len(trainable)} trainable "
                f"parameters ({', '.join(trainable[:3])}...): the optimizer would change them every "
                f"step. Freeze it first (`{name}.requires_grad_(False)`) or leave it out."
            )
        if not list(module.parameters()) and not list(module.buffers()):
            raise GuardConfigError(
                f"FrozenModuleGuard({where}) names {name!r}, which has no parameters or buffers, so "
                "there is nothing frozen to guard. Name the module that holds the frozen weights."
            )
        return module

    def _collect(self, pl_module: pl.LightningModule) -> None:
        """Gather the guarded tensors and the modules kept in eval, leaving out released tensors."""
        self._frozen = self._resolve(pl_module)
        tensors: dict[str, Tensor] = {}
        params: dict[str, nn.Parameter] = {}
        owners: dict[str, nn.Module] = {}
        for root_name, root in self._frozen.items():
            for sub_name, module in root.named_modules(prefix=root_name):
                own = [
                    (f"{sub_name}.{k}" if sub_name else k, t, True) for k, t in module.named_parameters(recurse=False)
                ]
                own += [
                    (f"{sub_name}.{k}" if sub_name else k, t, False) for k, t in module.named_buffers(recurse=False)
                ]
                kept = [(n, t, is_param) for n, t, is_param in own if n not in self._released and t is not None]
                for name, t, is_param in kept:
                    tensors[name], owners[name] = t, module
                    if is_param:
                        params[name] = t
        # norm="eval": trainable affine, but the statistics are frozen too.
        for name, module in pl_module.named_modules():
            if isinstance(module, StatsFrozenBatchNorm2d):
                for key in ("running_mean", "running_var"):
                    if f"{name}.{key}" not in self._released:
                        tensors.setdefault(f"{name}.{key}", getattr(module, key))
                        owners.setdefault(f"{name}.{key}", module)
        self._tensors, self._frozen_params, self._owners = tensors, params, owners
        self._eval_roots = eval_subtrees(pl_module, set(tensors))
        self._eval_modules = _modules_of(self._eval_roots)

    def _install_hooks(self) -> None:
        self._remove_hooks()
        self._hooks = {
            m: m.register_forward_pre_hook(_keep_eval) for m in self._eval_modules if isinstance(m, _MODE_SENSITIVE)
        }

    # ---- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise GuardConfigError(
                f"FrozenModuleGuard does not support {type(strategy).__name__}: it shards parameters across "
                "ranks, so a bit-for-bit copy and a cross-rank comparison of the frozen state would not mean "
                "what they say. Frozen BN needs no synchronisation: use DDP (`--config configs/ddp.yaml`, or "
                "`strategy: ddp`), or remove the guard (`--guard null`) for this strategy."
            )
        self._resolve(pl_module)  # fail fast on bad `modules` names, before any work
        self._trainer = trainer
        self._before_resume = {}
        self._remove_load_hook()
        # The checkpoint stores checksums, not values. When Lightning loads a checkpoint into the model
        # (a resume), keep the frozen tensors as the model was built just before: if a resumed tensor
        # was tampered with, these are its original values whenever their checksum matches the stored one.
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._keep_values_before_load)
        self._wrap_finetuning_callbacks(trainer)

    def _keep_values_before_load(self, module: nn.Module, *args: Any) -> None:
        self._collect(module)
        self._before_resume = {name: t.detach().clone() for name, t in self._tensors.items()}

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _wrap_finetuning_callbacks(self, trainer: pl.Trainer | None) -> None:
        """Watch each BaseFinetuning callback's epoch-start hook, where it unfreezes modules.

        Wrapping the hook (rather than looking afterwards) attributes each unfreeze to its callback and
        works whichever order the callbacks are listed in.
        """
        self._unwrap_finetuning_callbacks()
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, BaseFinetuning):
                original = callback.on_train_epoch_start

                def watched(tr: pl.Trainer, module: pl.LightningModule, _cb=callback, _orig=original) -> None:
                    _orig(tr, module)
                    self._after_finetuning(tr, module, type(_cb).__name__)

                callback.on_train_epoch_start = watched  # type: ignore[method-assign]
                self._wrapped.append(callback)

    def _unwrap_finetuning_callbacks(self) -> None:
        for callback in self._wrapped:
            vars(callback).pop("on_train_epoch_start", None)
        self._wrapped = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning warns about modules in eval mode just before on_train_start. The guard puts its
        # modules in eval itself in on_train_start, so leave them in train mode until then.
        for module in self._resolve(pl_module).values():
            module.train()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        self._trainer = trainer
        self._training_started = True
        self._collect(pl_module)
        self._set_eval()
        self._install_hooks()
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
        if self._training_started:
            self._verify(trainer, f"the end of fit (global step {trainer.global_step}, after every on_train_end)")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._training_started = False
        self._remove_hooks()
        self._remove_load_hook()
        self._unwrap_finetuning_callbacks()
        self._before_resume = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_checksums": self._reference_checksums,
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

    # ---- deliberate changes to the guarded set -----------------------------------------------
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
        selected = []
        for name in names:
            matches = [t for t in self._tensors if _under(t, name)]
            if not matches:
                gone = [e for r, e in self._released.items() if _under(r, name)]
                prefixes = {".".join(t.split(".")[:i]) for t in self._tensors for i in range(1, t.count(".") + 2)}
                close = difflib.get_close_matches(name, sorted(prefixes), n=3)
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
            self._named_frozen_module(pl_module, name, "protect(...)")
        before = set(self._tensors)
        for name in names:
            self._protected[name] = self._epochs_verified
            for released in [r for r in self._released if _under(r, name)]:
                del self._released[released]
        self._collect(pl_module)
        added = [n for n in self._tensors if n not in before]
        for name in added:
            self._reference[name] = self._tensors[name].detach().clone()
        self._reference_checksums.update(
            dict(zip(added, fingerprint([self._tensors[n] for n in added]).tolist())) if added else {}
        )
        self._set_eval()
        self._install_hooks()
        rank_zero_info(
            f"FrozenModuleGuard: now guarding {', '.join(names)} ({len(added)} tensors, reference taken at epoch "
            f"{self._trainer.current_epoch})."
        )
        return added

    def _after_finetuning(self, trainer: pl.Trainer, pl_module: pl.LightningModule, by: str) -> None:
        """Release what a BaseFinetuning callback just unfroze and gave to an optimizer."""
        switched = [n for n, p in self._frozen_params.items() if p.requires_grad]
        if trainer.strategy.reduce_boolean_decision(not switched, all=True):
            return  # nothing unfrozen on any rank
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        released = [n for n in switched if id(self._frozen_params[n]) in in_optimizer]
        held = [n for n in switched if n not in released]
        for name in held:
            # BaseFinetuning's unfreeze(train_bn=False) switches BN parameters on but gives them to no
            # optimizer: they cannot train, so they stay frozen (flag off again) and guarded.
            self._frozen_params[name].requires_grad_(False)
        if held:
            rank_zero_info(
                f"FrozenModuleGuard: {by} switched requires_grad on for {len(held)} parameters without giving "
                f"them to an optimizer (e.g. BatchNorm with train_bn=False): they stay frozen, guarded and in "
                f"eval mode ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''})."
            )
        released_set = set(released)
        # A layer whose parameters are all released trains as a whole: its buffers (BN statistics) go too.
        for name, owner in list(self._owners.items()):
            if name in self._frozen_params:
                continue
            owned = [n for n, o in self._owners.items() if o is owner and n in self._frozen_params]
            if owned and all(n in released_set for n in owned):
                released.append(name)
        self._release(released, by)

    def _release(self, names: list[str], by: str) -> None:
        trainer = self._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if trainer is not None:
            self._check_same_names(trainer, names, "released")
            if names:  # their requires_grad is on by now, deliberately: check only their values
                self._releasing = set(names)
                try:
                    self._verify(trainer, f"epoch {epoch}, before {by} released {len(names)} tensors")
                finally:
                    self._releasing = set()
        if not names:
            return
        for name in names:
            for table in (self._tensors, self._frozen_params, self._owners, self._reference, self._reference_checksums):
                table.pop(name, None)
            self._released[name] = epoch
        # What the release frees is every module no longer inside a fully guarded subtree: the layers
        # that owned the tensors, and the Dropout, ReLU and containers around them. They take the
        # LightningModule's mode (BN statistics update again if tracked) and lose their eval hooks.
        before = self._eval_modules
        root = trainer.lightning_module if trainer is not None else None
        self._eval_roots = eval_subtrees(root, set(self._tensors)) if root is not None else {}
        self._eval_modules = _modules_of(self._eval_roots)
        still = {id(m) for m in self._eval_modules}
        mode = root.training if root is not None else True
        for module in before:
            if id(module) in still:
                continue
            module.training = mode
            handle = self._hooks.pop(module, None)
            if handle is not None:
                handle.remove()
        shown = _summarise(names)
        rank_zero_info(
            f"FrozenModuleGuard: {by} released {len(names)} tensors at epoch {epoch} ({shown}); verified "
            f"bit-identical for {self._epochs_verified} epochs up to the release. {len(self._tensors)} tensors "
            "stay guarded."
        )

    def _check_same_names(self, trainer: pl.Trainer, names: list[str], what: str) -> None:
        """Under DDP, every rank must guard (or release) the same tensors: else stop, naming the ranks."""
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        digest = zlib.crc32("\n".join(sorted(names)).encode()) & 0x7FFFFFFF
        mine = torch.tensor([digest], dtype=torch.int64, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(mine).flatten().tolist()
        if len(set(gathered)) == 1:
            return
        everyone: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(everyone, sorted(names))
        lines = [
            f"  rank {r}: {len(n)} tensors {what}, differs from rank 0 in "
            f"{', '.join(sorted(set(n) ^ set(everyone[0]))[:5])}"
            for r, n in enumerate(everyone)
            if r and n != everyone[0]
        ]
        raise FrozenStateViolation(
            f"FrozenModuleGuard: the ranks do not agree on the {what} tensors:\n" + "\n".join(lines) + "\nEvery "
            "rank must freeze, unfreeze and release the same modules at the same point (rank-dependent code?)."
        )

    # ---- internals ---------------------------------------------------------------------------
    @property
    def epochs_verified(self) -> int:
        """How many training epochs have been verified bit-identical (survives resume)."""
        return self._epochs_verified

    @property
    def frozen_tensor_names(self) -> list[str]:
        """Names of the guarded tensors (valid after training started)."""
        return list(self._tensors)

    @property
    def released_tensor_names(self) -> list[str]:
        """Names of the tensors released deliberately (by a BaseFinetuning callback or :meth:`release`)."""
        return list(self._released)

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}

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
            if ref.device != live.device:  # at on_fit_end a GPU strategy has moved the model to the CPU
                ref = ref.to(live.device)
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
            f"{name}: requires_grad was switched back on"
            for name, p in self._frozen_params.items()
            if p.requires_grad and name not in self._releasing
        ]
        return lines

    def _verify(
        self, trainer: pl.Trainer, when: str, problems: list[str] | None = None, epoch_end: bool = False
    ) -> None:
        self._last_verified_step = trainer.global_step
        local = (problems or []) + self._local_changes()
        rank, world = trainer.global_rank, trainer.world_size
        diverged: list[str] = []
        if world > 1 and self.check_ranks:
            self._check_same_names(trainer, list(self._tensors), "guarded")  # same shapes for the gather
            mine = fingerprint(list(self._tensors.values())).to(trainer.strategy.root_device)
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
        # roots whose tensors were all released at an earlier epoch are not guarded any more
        guarded = {n: m for n, m in self._frozen.items() if any(_under(t, n) or not n for t in self._tensors)}
        for name, module in guarded.items():
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
        untracked = [
            m
            for m in self._eval_modules
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
        ]
        if untracked:
            extra += (
                f"\n  note: {len(untracked)} frozen BatchNorm layers have track_running_stats=False (as "
                "BaseFinetuning.freeze(train_bn=False) sets it): in train mode they would normalise with each "
                "batch's statistics; under the guard they run in eval mode with their running statistics."
            )
        forced = list(self._eval_roots)
        shown = ", ".join(forced[:6]) + (" ..." if len(forced) > 6 else "")
        extra += (
            f"\n  forced to eval mode: {len(forced)} fully frozen subtrees ({len(self._eval_modules)} modules)"
            + (f": {shown}" if forced else "")
            + "; the LightningModule and every module with a trainable part follow the Trainer's mode"
        )
        if self._released:
            released = _summarise(list(self._released))
            extra += f"\n  not guarded: {len(self._released)} tensors released at earlier epochs ({released})"
        rank_zero_info(
            f"FrozenModuleGuard: guarding {len(self._tensors)} frozen tensors in {len(guarded)} modules; "
            f"put them in eval mode at train start (Lightning's eval-mode warning does not apply to these).\n"
            f"  {'module':<32} {'type':<24} {'params':>11} {'buffers':>10}  mode\n" + "\n".join(rows) + extra
        )


def _modules_of(roots: dict[str, nn.Module]) -> list[nn.Module]:
    """Every module inside the given subtrees, each once."""
    seen: dict[int, nn.Module] = {}
    for root in roots.values():
        for module in root.modules():
            seen.setdefault(id(module), module)
    return list(seen.values())


def _summarise(names: list[str], limit: int = 4) -> str:
    """Tensor names shortened to their modules: ``backbone.0, backbone.3 (2 modules)``."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))
    more = " ..." if len(modules) > limit else ""
    return f"{', '.join(modules[:limit])}{more} ({len(modules)} modules)"


def _under(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is ``prefix`` itself or lies inside it (``backbone.0.weight`` under ``backbone``)."""
    return name == prefix or name.startswith(f"{prefix}.")
