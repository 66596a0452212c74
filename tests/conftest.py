"""Shared fixtures: seeded RNG and clean process-group state per test; `scripts/` importable once; OpenMP settings."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Set before torch loads OpenMP, which reads them once: idle OpenMP threads sleep instead of spinning. The
# suite runs several torch processes at once on few cores (DDP ranks, console processes, the scripts started
# early), and spinning threads held the cores the others waited for. GNU OpenMP (torch's Linux wheels) takes
# the spin count over the policy: a short spin first, for kernels that start many small parallel regions
# (docs/testing.md has the measurements). Values already set are kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
_THREADS = os.environ.get("OMP_NUM_THREADS")
if _THREADS not in (None, "1"):  # e.g. exported by a cluster's job script
    # Lightning sizes the forked DDP ranks' thread pools only when the variable is unset; with it set, the
    # 2-process `ddp_fork` tests hang for good in GNU OpenMP after the fork (the pytest process cannot be stopped
    # but by SIGKILL). Unset, each rank gets its share of the cores as in CI.
    del os.environ["OMP_NUM_THREADS"]
    warnings.warn(
        f"OMP_NUM_THREADS={_THREADS} is unset for the test suite: with it, the forked 2-process DDP tests hang in "
        "GNU OpenMP. Lightning then sizes each rank's threads itself; OMP_NUM_THREADS=1 is kept if you need it.",
        stacklevel=1,
    )
if "torch" in sys.modules:  # a plugin imported torch first: this process spins, its children do not
    warnings.warn(
        "torch was imported before tests/conftest.py: OMP_WAIT_POLICY reaches child processes only", stacklevel=1
    )

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
