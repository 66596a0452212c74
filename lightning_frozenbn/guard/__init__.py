"""FrozenModuleGuard and its parts: discovery, the ledger, cross-rank consensus, BaseFinetuning cooperation."""

from lightning_frozenbn.errors import FrozenStateViolation, GuardConfigError
from lightning_frozenbn.guard.callback import FrozenModuleGuard
from lightning_frozenbn.guard.discovery import eval_subtrees, find_frozen_modules, is_frozen_norm
from lightning_frozenbn.guard.ledger import Ledger, fingerprint

__all__ = [
    "FrozenModuleGuard",
    "FrozenStateViolation",
    "GuardConfigError",
    "Ledger",
    "eval_subtrees",
    "find_frozen_modules",
    "fingerprint",
    "is_frozen_norm",
]
