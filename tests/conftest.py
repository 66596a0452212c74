"""Shared fixtures: seeded RNG and clean process-group state per test; ``scripts/`` importable once, here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the benchmark's and study's modules


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    """Start the long scripts of the selected tests now (``EARLY`` in their module: test name -> arguments)."""
    from helpers import early_args, start_early

    if config.option.collectonly:
        return
    for item in items:
        args = early_args(item)
        if args is not None:
            start_early(item.nodeid, args)


@pytest.fixture(autouse=True)
def _seed_and_cleanup():
    torch.manual_seed(0)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
