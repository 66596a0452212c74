"""Releases of guarded tensors (BaseFinetuning's and ``guard.release``'s): which are released, which stay held."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from lightning_frozenbn.errors import GuardConfigError
from lightning_frozenbn.guard.discovery import under
from lightning_frozenbn.guard.ledger import Ledger
from lightning_frozenbn.guard.namespaces import BASE_FINETUNING

__all__ = ["FinetuningWatch", "frozen_again", "select_release", "split_unfrozen", "train_released_again"]


def split_unfrozen(ledger: Ledger, optimizers: list[Any]) -> tuple[list[str], list[str]]:
    """The guarded parameters switched on, split into released (given to an optimizer) and held (not).

    ``unfreeze_and_add_param_group(train_bn=False)`` switches BatchNorm parameters on but gives them to
    no optimizer: they cannot train, so they stay frozen and guarded ("held"). A layer whose guarded
    parameters are all released trains as a whole, so its buffers (BN statistics) are released with it.
    """
    switched = [n for n, p in ledger.params.items() if p.requires_grad]
    in_optimizer = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    released = [n for n in switched if id(ledger.records[n].live) in in_optimizer]
    held = [n for n in switched if n not in released]
    return released + ledger.buffers_of_released_owners(set(released)), held


def select_release(ledger: Ledger, names: tuple[str, ...], released: dict[str, int]) -> list[str]:
    """The guarded tensors under each of ``names`` (module or tensor names), or a :class:`GuardConfigError`.

    A name that matches nothing says whether it was released already (and when) and what is close.
    """
    selected: list[str] = []
    for name in names:
        matches = ledger.select(name)
        if not matches:
            gone = [epoch for r, epoch in released.items() if under(r, name)]
            close = difflib.get_close_matches(name, ledger.prefixes(), n=3)
            hint = f" It was released at epoch {gone[0]}." if gone else ""
            hint += f" Close matches: {', '.join(close)}." if close else ""
            raise GuardConfigError(
                f"FrozenModuleGuard.release({name!r}): no guarded tensor is named so or lies under it.{hint} "
                "Guarded tensors are listed by `guard.frozen_tensor_names` once training has started."
            )
        selected += [m for m in matches if m not in selected]
    return selected


def train_released_again(model: Any, released: Any, optimizers: list[Any]) -> list[str]:
    """Switch ``requires_grad`` back on for the parameters :func:`frozen_again` finds; return their names."""
    again = frozen_again(model, released, optimizers)
    for name in again:
        model.get_parameter(name).requires_grad_(True)
    return again


def frozen_again(model: Any, released: Any, optimizers: list[Any]) -> list[str]:
    """The released parameters that sit in an optimizer with ``requires_grad=False``: they would not train.

    After a resume, Lightning's ``BaseFinetuning`` freezes its modules again in ``setup`` and restores only
    the optimizer's parameter groups, so a backbone released before the interruption stops training.
    """
    in_optimizer = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return [n for n, p in model.named_parameters() if n in released and not p.requires_grad and id(p) in in_optimizer]


class FinetuningWatch:
    """Wraps each BaseFinetuning callback's epoch-start hook, where it unfreezes modules, to call ``after``.

    Wrapping the hook (rather than looking afterwards) attributes each unfreeze to its callback and works
    whichever order the callbacks are listed in.
    """

    def __init__(self) -> None:
        self._wrapped: list[Any] = []

    def wrap(self, trainer: pl.Trainer | None, after: Callable[[pl.Trainer, pl.LightningModule, str], None]) -> None:
        """Watch every BaseFinetuning callback of ``trainer`` (``lightning.pytorch``'s or ``pytorch_lightning``'s)."""
        self.unwrap()
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, BASE_FINETUNING):
                original = callback.on_train_epoch_start

                def watched(tr: pl.Trainer, module: pl.LightningModule, _cb: Any = callback, _orig: Any = original):
                    _orig(tr, module)
                    after(tr, module, type(_cb).__name__)

                callback.on_train_epoch_start = watched  # type: ignore[method-assign]
                self._wrapped.append(callback)

    def unwrap(self) -> None:
        """Give the callbacks their own hook back."""
        for callback in self._wrapped:
            vars(callback).pop("on_train_epoch_start", None)
        self._wrapped = []
