"""Run Lightning's own tests with and without a FrozenModuleGuard in every Trainer, side by side.

The widest check of "the guard works in any Lightning project": Lightning's tests build hundreds of
Trainers with callbacks, finetuning, weight averaging, restores and hooks of every kind. Each test file
is run three times: plain, with the guard first in every Trainer's callback list, and with it last
(``scripts/lightning_compat_plugin.py`` injects it). Printed: passed/failed/skipped per run and file,
every test that passes plain but not with the guard, and how many Trainers got the guard and how many
fits it guarded something in (so an injection that silently did nothing cannot pass as compatible).

Needs a source tree of Lightning at the installed version (its ``tests/tests_pytorch``), e.g. a checkout
of Lightning's repository at the tag of ``lightning.__version__``, and Lightning's test dependencies
that the chosen files import (cloudpickle, scikit-learn, pandas, psutil, tensorboard). Not part of CI.

Usage:
    python scripts/lightning_compat.py LIGHTNING_SRC [--files F ...] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

FILES = [
    "callbacks/test_finetuning_callback.py",
    "callbacks/test_weight_averaging.py",
    "callbacks/test_stochastic_weight_avg.py",
    "callbacks/test_early_stopping.py",
    "callbacks/test_lr_monitor.py",
    "callbacks/test_callbacks.py",
    "models/test_hooks.py",
    "models/test_restore.py",
    "models/test_cpu.py",
    "core/test_lightning_module.py",
    "tuner/test_lr_finder.py",
    "trainer/test_trainer.py",
    "trainer/connectors/test_callback_connector.py",
]
HERE = Path(__file__).resolve().parent


def run(src: Path, files: list[str], mode: str, workdir: Path) -> dict:
    """One pytest run over ``files``; ``mode`` is plain, first or last. Outcomes per test and the events."""
    xml, events = workdir / f"{mode}.xml", workdir / f"{mode}-events.jsonl"
    events.write_text("")
    env = {**os.environ, "COMPAT_EVENTS": str(events), "COMPAT_GUARD_ORDER": mode, "PYTHONPATH": str(HERE)}
    env["PYTHONPATH"] += os.pathsep + str(src / "tests")
    cmd = [sys.executable, "-m", "pytest", *[f"tests_pytorch/{f}" for f in files], "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:randomly", f"--junitxml={xml}", "-o", "addopts=", "--timeout=600"]
    if mode != "plain":
        cmd += ["-p", "lightning_compat_plugin"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=src / "tests", env=env, capture_output=True, text=True)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase") if xml.exists() else ():
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return {
        "seconds": round(time.time() - start),
        "returncode": proc.returncode,
        "outcomes": outcomes,
        "trainers": sum(e["event"] == "trainer" for e in lines),
        "fits_guarding_something": sum(e["event"] == "guarding" and e["tensors"] > 0 for e in lines),
        "fits_guarding_nothing": sum(e["event"] == "guarding" and e["tensors"] == 0 for e in lines),
        "tail": proc.stdout[-3000:] + proc.stderr[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="Lightning source tree holding tests/tests_pytorch")
    parser.add_argument("--files", nargs="+", default=FILES, help="test files under tests/tests_pytorch")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    import lightning
    import torch

    src = args.src.resolve()
    if not (src / "tests" / "tests_pytorch").is_dir():
        parser.error(f"{src} has no tests/tests_pytorch: pass the root of a Lightning source tree.")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: run(src, args.files, mode, Path(tmp)) for mode in ("plain", "first", "last")}
    print(f"lightning {lightning.__version__}, torch {torch.__version__}, tests from {src}")
    print(f"{'run':<14}{'passed':>8}{'failed':>8}{'skipped':>9}{'Trainers':>10}{'guarding':>10}{'seconds':>9}")
    for mode, result in runs.items():
        counts = Counter(result["outcomes"].values())
        label = {"plain": "no guard", "first": "guard first", "last": "guard last"}[mode]
        trainers = result["trainers"] if mode != "plain" else "-"
        guarding = result["fits_guarding_something"] if mode != "plain" else "-"
        print(
            f"{label:<14}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}"
            f"{trainers:>10}{guarding:>10}{result['seconds']:>9}"
        )
    plain = runs["plain"]["outcomes"]
    regressions = {}
    for mode in ("first", "last"):
        broken = sorted(t for t, o in plain.items() if o == "passed" and runs[mode]["outcomes"].get(t) != "passed")
        regressions[mode] = broken
        print(f"\npass without the guard, not with it ({mode}): {len(broken)}")
        for name in broken:
            print(f"  {name}")
    if args.out is not None:
        summary = {
            "command": " ".join(["python", "scripts/lightning_compat.py", *sys.argv[1:]]),
            "lightning": lightning.__version__,
            "torch": torch.__version__,
            "files": args.files,
            "runs": {m: {k: v for k, v in r.items() if k not in ("outcomes", "tail")} for m, r in runs.items()},
            "counts": {m: dict(Counter(r["outcomes"].values())) for m, r in runs.items()},
            "regressions": regressions,
        }
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
