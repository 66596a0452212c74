"""The guard's freeze report: what is guarded, what is forced to eval mode, what was released."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_frozenbn.guard.eval_mode import mode_sensitive_kinds

__all__ = [
    "held_line",
    "late_frozen_warning",
    "released_again_line",
    "released_line",
    "eval_overrides",
    "freeze_report",
    "summarise",
]

# Settings of other callbacks that keep frozen BatchNorm layers in train mode, which the guard overrides.
_KEEPS_FROZEN_BN_TRAINING = ("frozen_bn_track_running_stats", "train_bn")


def eval_overrides(callbacks: list[object], forced: list[nn.Module]) -> list[str]:
    """Each callback setting that asks for frozen BatchNorm layers in train mode, when the guard forces some to eval.

    FinetuningScheduler's ``frozen_bn_track_running_stats=True`` (its default) and ``BaseFinetuning``'s
    ``train_bn=True`` keep BN layers training; inside a fully frozen subtree the guard runs them in eval,
    so their statistics stay frozen: that is said, naming the callback and its setting.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in forced):
        return []
    return [
        f"{type(cb).__name__}({setting}=True)"
        for cb in callbacks
        for setting in _KEEPS_FROZEN_BN_TRAINING
        if getattr(cb, setting, None) is True
    ]


def freeze_report(
    n_guarded: int,
    guarded: dict[str, nn.Module],
    forced_roots: dict[str, nn.Module],
    forced: list[nn.Module],
    released: list[str],
    stats_frozen: int = 0,
    overrides: Sequence[str] = (),
) -> str:
    """The freeze report logged when training starts: what is guarded, what is forced to eval, what not.

    Args:
        n_guarded: how many tensors are guarded.
        guarded: the frozen modules that still hold a guarded tensor, by name.
        forced_roots: the fully frozen subtrees forced to eval mode, by name.
        forced: every module in them.
        released: the tensors released at earlier epochs.
        stats_frozen: how many ``norm="eval"`` layers have their running statistics guarded.
        overrides: the other callbacks' settings the eval forcing overrides (:func:`eval_overrides`).
    """
    rows = []
    for name, module in guarded.items():
        n_params = sum(p.numel() for p in module.parameters())
        n_buffers = sum(b.numel() for b in module.buffers())
        mode = "eval" if not module.training else "train"
        rows.append(f"  {name or '<root>':<32} {type(module).__name__:<24} {n_params:>11,} {n_buffers:>10,}  {mode}")
    extra = f"\n  + running stats of {stats_frozen} StatsFrozenBatchNorm2d layers (norm='eval')" if stats_frozen else ""
    untracked = [m for m in forced if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    if untracked:
        extra += (
            f"\n  note: {len(untracked)} frozen BatchNorm layers have track_running_stats=False (as "
            "BaseFinetuning.freeze(train_bn=False) sets it): in train mode they would normalise with each "
            "batch's statistics; under the guard they run in eval mode with their running statistics."
        )
    roots = list(forced_roots)
    shown = ", ".join(roots[:6]) + (" ..." if len(roots) > 6 else "")
    extra += (
        f"\n  forced to eval mode: {len(roots)} fully frozen subtrees ({len(forced)} modules)"
        + (f": {shown}" if roots else "")
        + "; the LightningModule and every module with a trainable part follow the Trainer's mode"
    )
    kinds = mode_sensitive_kinds(forced)
    if kinds:
        listed = ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))
        extra += f"\n  layers among them that compute differently in train mode, run in eval in every forward: {listed}"
    if overrides:
        extra += (
            f"\n  overrides {', '.join(overrides)}: that setting keeps frozen BatchNorm layers in train mode "
            "(their running statistics would move); inside fully frozen subtrees the guard runs them in eval "
            "mode. Unfreeze (release) the layers that should train, or leave the guard out to keep that setting."
        )
    if released:
        extra += f"\n  not guarded: {len(released)} tensors released at earlier epochs ({summarise(released)})"
    return (
        f"FrozenModuleGuard: guarding {n_guarded} frozen tensors in {len(guarded)} modules; "
        f"put them in eval mode at train start (Lightning's eval-mode warning does not apply to these).\n"
        f"  {'module':<32} {'type':<24} {'params':>11} {'buffers':>10}  mode\n" + "\n".join(rows) + extra
    )


def summarise(names: list[str], limit: int = 4) -> str:
    """Tensor names shortened to their modules: ``backbone.0, backbone.3 (2 modules)``."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))
    more = " ..." if len(modules) > limit else ""
    return f"{', '.join(modules[:limit])}{more} ({len(modules)} modules)"


def released_again_line(again: list[str]) -> str:
    """After a resume: parameters released before it had been frozen again, and train again now."""
    return (
        f"FrozenModuleGuard: {len(again)} parameters released before the resume ({summarise(again)}) are in the "
        "optimizer but were frozen again (BaseFinetuning freezes in setup and restores only the optimizer's "
        "groups): requires_grad is switched back on, so they train as before the interruption."
    )


def late_frozen_warning(late: list[str]) -> str:
    """Modules frozen after training started, not guarded: how to guard them."""
    one = len(late) == 1
    return (
        f"FrozenModuleGuard: {', '.join(late[:5])}{' ...' if len(late) > 5 else ''} {'was' if one else 'were'} "
        f"frozen after training started and {'is' if one else 'are'} not guarded: nothing proves "
        f"{'it' if one else 'they'} stay unchanged. Call guard.protect({late[0]!r}) right after freezing to guard "
        "it from then on."
    )


def held_line(by: str, held: list[str]) -> str:
    """Parameters a finetuning callback switched on without giving them to an optimizer: they stay guarded."""
    return (
        f"FrozenModuleGuard: {by} switched requires_grad on for {len(held)} parameters without giving them to an "
        f"optimizer (e.g. BatchNorm with train_bn=False): they stay frozen, guarded and in eval mode "
        f"({', '.join(held[:3])}{' ...' if len(held) > 3 else ''})."
    )


def released_line(by: str, names: list[str], epoch: int, epochs_verified: int, still: int) -> str:
    """A deliberate release: what, when, and how long it was verified before."""
    return (
        f"FrozenModuleGuard: {by} released {len(names)} tensors at epoch {epoch} ({summarise(names)}); verified "
        f"bit-identical for {epochs_verified} epochs up to the release. {still} tensors stay guarded."
    )
