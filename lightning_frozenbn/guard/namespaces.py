"""Lightning's classes the guard recognises, from both namespaces: ``lightning.pytorch`` and ``pytorch_lightning``.

Most existing projects ``import pytorch_lightning as pl``; its classes are copies, not subclasses, of
``lightning.pytorch``'s, so an ``isinstance`` check against one namespace misses the other's callbacks
and strategies. Each tuple here holds the class from every namespace that is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BASE_FINETUNING", "SHARDED_STRATEGIES", "SWA", "namespaces"]


def namespaces() -> list[Any]:
    """The installed Lightning namespaces: ``lightning.pytorch`` always, ``pytorch_lightning`` where installed."""
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:  # pytorch_lightning is optional
            continue
    return found


def _classes(*paths: str) -> tuple[type, ...]:
    out: list[type] = []
    for namespace in namespaces():
        for path in paths:
            obj: Any = namespace
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type) and obj not in out:
                out.append(obj)
    return tuple(out)


BASE_FINETUNING = _classes("callbacks.BaseFinetuning")
SWA = _classes("callbacks.StochasticWeightAveraging")
SHARDED_STRATEGIES = _classes(
    "strategies.FSDPStrategy", "strategies.DeepSpeedStrategy", "strategies.ModelParallelStrategy"
)
