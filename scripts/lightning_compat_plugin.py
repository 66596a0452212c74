"""pytest plugin: every Lightning ``Trainer`` built during the tests gets a FrozenModuleGuard (see lightning_compat.py).

Loaded with ``-p lightning_compat_plugin`` (this folder on PYTHONPATH). ``COMPAT_GUARD_ORDER`` is ``first``
or ``last`` (where the guard goes in the callback list); ``COMPAT_EVENTS`` is a file that gets one JSON line
per Trainer built and per fit the guard guarded something in, from every process (DDP spawns too), so the
injection itself is verified, not assumed.
"""

from __future__ import annotations

import functools
import json
import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_frozenbn import FrozenModuleGuard


def _record(event: str, **fields: object) -> None:
    with open(os.environ["COMPAT_EVENTS"], "a") as f:
        f.write(json.dumps({"event": event, "test": os.environ.get("PYTEST_CURRENT_TEST", ""), **fields}) + "\n")


class InjectedGuard(FrozenModuleGuard):
    """The guard as a user adds it, recording whether it found anything to guard."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        _record("guarding", tensors=len(self.frozen_tensor_names))


def pytest_configure(config: object) -> None:
    order = os.environ.get("COMPAT_GUARD_ORDER", "last")
    original = pl.Trainer.__init__

    @functools.wraps(original)
    def init(self: pl.Trainer, *args: object, **kwargs: object) -> None:
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        guard = InjectedGuard()
        kwargs["callbacks"] = [guard, *callbacks] if order == "first" else [*callbacks, guard]
        _record("trainer", order=order)
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = init
