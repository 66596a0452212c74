"""A resumed fit: the frozen values as built kept while the checkpoint loads, then compared with its checksums."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_frozenbn.guard.ledger import Ledger

__all__ = ["ResumeCheck"]


class ResumeCheck:
    """What the guard knows of a checkpoint it resumes from, and the values the model had before loading it.

    The checkpoint stores checksums, not values (the values would double its size). When Lightning loads
    a checkpoint into the model, a load pre-hook keeps the frozen tensors as the model was built just
    before: if a resumed tensor was tampered with, these are its original values whenever their checksum
    matches the stored one, so ``on_violation="restore"`` can still restore it.
    """

    def __init__(self) -> None:
        self.loaded_checksums: dict[str, list[int]] | None = None  # from the guard's state in the checkpoint
        self._before_load: dict[str, Tensor] = {}
        self._hook: Any = None

    def attach(self, model: nn.Module, collect: Callable[[nn.Module], Ledger]) -> None:
        """Keep ``collect(model)``'s reference values whenever a state dict is loaded into ``model``."""
        self.detach()

        def keep(module: nn.Module, *args: Any) -> None:
            self._before_load = {name: record.reference for name, record in collect(module).records.items()}

        self._hook = model.register_load_state_dict_pre_hook(keep)

    def detach(self) -> None:
        """Stop watching loads; forget the kept values."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._before_load = {}

    def compare(self, ledger: Ledger) -> tuple[list[str], list[str]]:
        """``(problems, unrecoverable)``: the loaded tensors that differ from the checkpoint's checksums."""
        if self.loaded_checksums is None:
            return [], []
        return ledger.compare_with_checkpoint(self.loaded_checksums, self._before_load)
