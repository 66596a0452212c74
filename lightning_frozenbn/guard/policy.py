"""The guard's policies: its settings checked, and what a violation does (``on_violation``), in one place."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_frozenbn.errors import FrozenStateViolation, GuardConfigError
from lightning_frozenbn.guard.consensus import Consensus
from lightning_frozenbn.guard.ledger import Ledger
from lightning_frozenbn.guard.namespaces import SHARDED_STRATEGIES, SWA

__all__ = ["ON_VIOLATION", "OnViolation", "apply_policy", "check_arguments", "hints", "refuse_sharded"]

OnViolation = Literal["raise", "warn", "restore"]
ON_VIOLATION: tuple[str, ...] = get_args(OnViolation)  # one source for the CLI and the check


def check_arguments(modules: Any, on_violation: Any, every_n_train_steps: Any) -> None:
    """The guard's settings, each refused with the value and what is expected."""
    if on_violation not in ON_VIOLATION:
        raise GuardConfigError(
            f"FrozenModuleGuard(on_violation={on_violation!r}) is not supported: expected 'raise', 'warn' or 'restore'."
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


def refuse_sharded(strategy: Any) -> None:
    """Refuse a sharding strategy (FSDP, DeepSpeed, ModelParallel) in either Lightning namespace, naming it."""
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise GuardConfigError(
            f"FrozenModuleGuard does not support {type(strategy).__name__}: it shards parameters across "
            "ranks, so a bit-for-bit copy and a cross-rank comparison of the frozen state would not mean "
            "what they say. Frozen BN needs no synchronisation: use DDP (strategy: ddp), or remove the "
            "FrozenModuleGuard callback for this strategy."
        )


def hints(trainer: pl.Trainer, lines: list[str]) -> list[str]:
    """What caused a violation, where a known callback did it: SWA's reset of every BatchNorm's statistics."""
    swa = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, SWA)]
    if swa and any("running_" in line and "replaced by a new tensor" in line for line in lines):
        return [
            f"  {swa[0]} replaced the running statistics of every BatchNorm layer by new tensors (mean 0, var 1) "
            "to recompute them in its extra epoch; frozen layers run in eval mode and recompute nothing, so "
            "their statistics are lost. Keep frozen BatchNorm out of SWA's reset (norm='frozen': "
            "FrozenBatchNorm2d is no torch BatchNorm) or leave StochasticWeightAveraging out."
        ]
    return []


def apply_policy(
    policy: str,
    ledger: Ledger,
    ranks: Consensus,
    message: str,
    diverged: list[str],
    unrecoverable: list[str],
    trainable: Sequence[Tensor] = (),
) -> None:
    """The ``on_violation`` policy: the one place with the side effects of a violation (all ranks call it).

    ``trainable``: the trainable parameters, when they differ across ranks (a restore broadcasts rank 0's).
    """
    if policy == "raise":
        raise FrozenStateViolation(
            message + "\nFrozen tensors must stay bit-identical. Fix the code that changed them, or pass "
            "FrozenModuleGuard(on_violation='restore') to put the reference values back."
        )
    warn = rank_zero_warn if ranks.world_size > 1 or ranks.rank == 0 else warnings.warn
    if policy == "warn":
        warn(message)
        return
    if not ranks.all_agree(not unrecoverable):
        raise FrozenStateViolation(
            message + "\non_violation='restore' cannot restore values that no longer exist. Resume from a "
            "checkpoint whose frozen tensors are intact, or build the model from the weights the first fit "
            "started from, so that the guard can restore them."
        )
    unrestorable = ledger.unrestorable()
    if not ranks.all_agree(not unrestorable):
        raise FrozenStateViolation(
            message
            + "\non_violation='restore' cannot restore what the forward no longer reads:\n  "
            + "\n  ".join(unrestorable)
        )
    ledger.restore()
    if diverged or trainable:  # the frozen or the trainable tensors differ across ranks: rank 0's for all
        ranks.broadcast_from_zero(ledger.live() + list(trainable))
        ledger.adopt_live_as_reference()
    left = ledger.changes()
    if not ranks.all_agree(not left):
        raise FrozenStateViolation(
            message
            + "\non_violation='restore' restored the reference values, yet these still differ:\n  "
            + "\n  ".join(left or ["(on another rank)"])
        )
    warn(message + "\nRestored the reference values of these tensors.")
