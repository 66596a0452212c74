"""One verification of the guarded state: local differences and rank agreement decided, then settled by the policy."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_frozenbn.guard.consensus import Consensus
from lightning_frozenbn.guard.ledger import Ledger, fingerprint
from lightning_frozenbn.guard.policy import apply_policy, hints

__all__ = ["Verdict", "verify"]


@dataclass
class Verdict:
    """What one verification found, on every rank alike (the decision; the callback acts on it).

    Attributes:
        ranks: the consensus it was reached with (local-only at the end of fit).
        local: this rank's own findings (changed, replaced, pruned tensors; checkpoint mismatches).
        agreed: every rank found nothing locally.
        diverged: frozen tensors whose values differ between ranks.
        diverged_trainable: trainable parameters whose values differ between ranks.
        trainable: the trainable parameters compared across ranks (empty on one rank).
    """

    ranks: Consensus
    local: list[str]
    agreed: bool
    diverged: list[str] = field(default_factory=list)
    diverged_trainable: list[str] = field(default_factory=list)
    trainable: dict[str, Tensor] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Bit-identical on every rank, and the ranks hold one model."""
        return self.agreed and not self.diverged and not self.diverged_trainable

    def ok_line(self, guarded: int, when: str, world_size: int, local_only: bool) -> str:
        """The one line a clean verification prints: it says "bit-identical" only when it is."""
        ranks_word = f"{'each of' if local_only else 'all'} {world_size} ranks"
        where = "on rank 0" if world_size == 1 else f"on {ranks_word}"
        same = f"; its {len(self.trainable)} trainable parameters the same on every rank" if self.trainable else ""
        return f"FrozenModuleGuard: {guarded} frozen tensors bit-identical at {when} {where}{same}."

    def report(self, trainer: pl.Trainer, when: str) -> str:
        """The violation report: every rank's findings (gathered: a collective), the divergences, the hints."""
        reports = self.ranks.gather_objects((trainer.global_rank, self.local))
        lines = [f"  rank {r}: {line}" for r, rank_lines in reports for line in rank_lines]
        only_trainable = not lines and not self.diverged
        what = "the ranks hold different trainable parameters" if only_trainable else "the frozen state changed"
        found = lines + [f"  {d}" for d in self.diverged + self.diverged_trainable] + hints(trainer, lines)
        return f"FrozenModuleGuard: {what} at {when}:\n" + "\n".join(found)

    def settle(
        self,
        on_violation: str,
        trainer: pl.Trainer,
        ledger: Ledger,
        when: str,
        unrecoverable: list[str] | None = None,
        local_only: bool = False,
    ) -> bool:
        """Say "bit-identical" when it is; else hand the report to ``on_violation``'s policy. True when clean."""
        if self.ok:
            rank_zero_info(self.ok_line(len(ledger.names), when, trainer.world_size, local_only))
            return True
        restore_trainable = list(self.trainable.values()) if self.diverged_trainable else []
        args = (self.diverged, unrecoverable or [], restore_trainable)
        apply_policy(on_violation, ledger, self.ranks, self.report(trainer, when), *args)
        return False


def verify(
    trainer: pl.Trainer,
    ledger: Ledger,
    *,
    check_ranks: bool,
    problems: list[str] | None = None,
    releasing: frozenset[str] = frozenset(),
    local_only: bool = False,
) -> Verdict:
    """Compare the guarded tensors with their reference, and under DDP the ranks with each other.

    ``releasing``: tensors about to be released, whose ``requires_grad`` is on deliberately (values
    only). ``local_only``: no collective (the end of fit, see the callback's ``on_fit_end``).
    """
    local = (problems or []) + ledger.changes(releasing)
    ranks = Consensus.of(trainer).local() if local_only else Consensus.of(trainer)
    verdict = Verdict(ranks, local, agreed=False)
    if ranks.world_size > 1 and check_ranks:
        ranks.check_same_names(ledger.names, "guarded")  # same shapes for the reductions
        verdict.diverged = ranks.diverged(ledger.names, fingerprint(ledger.live()))
        # "every rank trains the same model": the trainable parameters too (buffers of training BN are
        # rank-local between DDP's broadcasts, so they are not compared)
        trainable = {n: p for n, p in trainer.lightning_module.named_parameters() if p.requires_grad}
        ranks.check_same_names(list(trainable), "trainable")
        verdict.trainable = trainable
        verdict.diverged_trainable = ranks.diverged(list(trainable), fingerprint(list(trainable.values())), "trainable")
    verdict.agreed = ranks.all_agree(not local)
    return verdict
