"""Eval mode for frozen subtrees: forward pre-hooks on every module, and which layers compute differently in train."""

from __future__ import annotations

import inspect
from collections import Counter
from functools import cache
from typing import Any

from torch import nn

__all__ = ["EvalForcing", "mode_sensitive_kinds"]

# Layers whose forward is known to depend on train/eval mode, whatever their source says.
_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


@cache
def _forward_reads_training(cls: type) -> bool:
    """Whether ``cls.forward``'s source reads ``self.training`` (timm's DropPath, torchvision's StochasticDepth)."""
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (compiled, built in): not known to depend on the mode
        return False


def mode_sensitive_kinds(modules: list[nn.Module]) -> Counter[str]:
    """How many modules of each kind among ``modules`` compute differently in train mode (BN, Dropout, DropPath)."""
    return Counter(
        type(m).__name__ for m in modules if isinstance(m, _MODE_SENSITIVE) or _forward_reads_training(type(m))
    )


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on every module of a frozen subtree: it runs in eval mode, whoever called ``.train()``."""
    if module.training:
        module.training = False


class EvalForcing:
    """The modules forced to eval mode, and the forward pre-hooks that keep every one of them there.

    One rule for every layer: a callback hook can act at the start of a batch at the latest; the pre-hooks
    act right before each module runs, so even a ``self.train()`` inside ``training_step`` cannot put a
    BatchNorm, a Dropout, a stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``) or
    a user's own mode-dependent layer inside a frozen subtree in train mode. Every module gets the hook,
    not a list of known kinds, because any forward may read ``self.training``.
    """

    def __init__(self) -> None:
        self.roots: dict[str, nn.Module] = {}
        self.modules: list[nn.Module] = []
        self._hooks: dict[nn.Module, Any] = {}

    def set(self, roots: dict[str, nn.Module], mode: bool) -> None:
        """Force the subtrees ``roots`` to eval from now on; modules that leave the set take ``mode``."""
        before = self.modules
        self.roots = dict(roots)
        seen: dict[int, nn.Module] = {}
        for root in self.roots.values():
            for module in root.modules():
                seen.setdefault(id(module), module)
        self.modules = list(seen.values())
        for module in before:
            if id(module) not in seen:
                module.training = mode
                handle = self._hooks.pop(module, None)
                if handle is not None:
                    handle.remove()

    def apply(self) -> bool:
        """Put the modules in eval mode; whether any had been put back in train mode."""
        flipped = False
        for module in self.modules:
            if module.training:
                module.training = False
                flipped = True
        return flipped

    def install_hooks(self) -> None:
        """A pre-hook on every module of the set."""
        self.remove_hooks()
        self._hooks = {m: m.register_forward_pre_hook(_keep_eval) for m in self.modules}

    def remove_hooks(self) -> None:
        """Remove every pre-hook: after fit the modules are the user's again."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}

    @property
    def hooked(self) -> list[nn.Module]:
        """The layers that have a pre-hook now."""
        return list(self._hooks)
