"""What is frozen: the frozen modules and norm layers of a model, and the subtrees that run in eval mode."""

from __future__ import annotations

import difflib

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_frozenbn.errors import GuardConfigError
from lightning_frozenbn.guard.report import late_frozen_warning

__all__ = [
    "LateFrozen",
    "defines_configure_model",
    "eval_subtrees",
    "find_frozen_modules",
    "guarded_roots",
    "is_frozen_norm",
    "named_frozen_module",
    "under",
    "unguarded_frozen",
]


def under(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is ``prefix`` itself or lies inside it (``backbone.0.weight`` under ``backbone``)."""
    return name == prefix or name.startswith(f"{prefix}.")


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


def unguarded_frozen(model: nn.Module, guarded: set[str], released: set[str]) -> list[str]:
    """The frozen modules (as :func:`find_frozen_modules` finds them) holding a tensor neither guarded nor released.

    A module frozen mid-run by code that did not call ``guard.protect`` is one.
    """
    out = []
    for name, module in find_frozen_modules(model).items():
        own = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        own += [f"{name}.{n}" if name else n for n, b in module.named_buffers() if b is not None]
        if any(t not in guarded and t not in released for t in own):
            out.append(name)
    return out


def defines_configure_model(model: nn.Module) -> bool:
    """Whether the LightningModule builds (part of) itself in ``configure_model``, after the callbacks' ``setup``."""
    bases = ("LightningModule", "ModelHooks")
    return any("configure_model" in vars(c) for c in type(model).__mro__ if c.__name__ not in bases)


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


def named_frozen_module(model: nn.Module, name: str, where: str) -> nn.Module:
    """The submodule ``name`` of ``model``, checked to be frozen and to hold tensors (``modules=``, ``protect``)."""
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise GuardConfigError(
            f"FrozenModuleGuard({where}) names {name!r}, which is not a submodule of "
            f"{type(model).__name__}.{hint} Use names from `model.named_modules()`, or pass "
            "modules=None to find the frozen modules automatically."
        )
    module = model.get_submodule(name)
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


def eval_subtrees(model: nn.Module, guarded: set[str]) -> dict[str, nn.Module]:
    """The largest subtrees below ``model`` whose every tensor is in ``guarded`` (and that hold at least one).

    These are what "frozen" means for train/eval mode: every module inside them (Dropout, ReLU and
    containers too) runs in eval. The root itself is never one (the LightningModule follows the
    Trainer), nor is a module with a trainable or released tensor anywhere below it, nor a module that
    holds no tensor at all outside such a subtree (a Dropout beside trainable layers follows its parent).
    """
    fully: dict[str, bool] = {}

    def visit(module: nn.Module, name: str) -> tuple[bool, bool]:
        own = [k for k, _ in module.named_parameters(recurse=False)]
        own += [k for k, t in module.named_buffers(recurse=False) if t is not None]
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
        if name and fully.get(name) and not any(under(name, f) for f in found):
            found[name] = module
    return found


def guarded_roots(model: nn.Module, modules: list[str] | None, protected: list[str]) -> dict[str, nn.Module]:
    """The modules to guard: ``modules`` by name (checked), else those :func:`find_frozen_modules` finds.

    Plus each module ``protect()`` named that none of them contains.
    """
    found = (
        find_frozen_modules(model)
        if modules is None
        else {name: named_frozen_module(model, name, "modules=...") for name in modules}
    )
    for name in protected:
        if not any(under(name, n) for n in found):
            found[name] = named_frozen_module(model, name, "protect(...)")
    return found


class LateFrozen:
    """Warns once per module frozen after training started that nothing guards (automatic mode)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def warn(self, model: nn.Module, guarded: list[str], released: list[str]) -> None:
        """One warning naming the modules frozen since the last check, and how to guard them."""
        late = [n for n in unguarded_frozen(model, set(guarded), set(released)) if n not in self.warned]
        if late:
            self.warned.update(late)
            rank_zero_warn(late_frozen_warning(late))
