"""A non-editable install holds every module: the wheel is built and its contents compared with the source tree."""

import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_the_wheel_contains_every_module_of_the_package(tmp_path):
    """An editable install reads the source tree and hides a sub-package that packaging leaves out. Built from
    a copy of the sources, so that no build/ folder an earlier build left can fill the gap."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "lightning_frozenbn", src / "lightning_frozenbn", ignore=shutil.ignore_patterns("__pycache__")
    )
    command = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run([*command, "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("lightning_frozenbn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packed = {name for name in names if name.endswith(".py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_frozenbn").rglob("*.py")}
    assert sorted(source - packed) == [], "modules missing from the wheel"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"lightning-frozenbn = lightning_frozenbn.cli:main" in entry_points
