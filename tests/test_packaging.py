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


def _imports(path, module):
    """The package modules ``module`` imports anywhere in its file (function-level imports included)."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return found


def test_no_import_cycle_between_the_package_modules_lazy_imports_included():
    """Each module, with every import it makes anywhere (top level or inside a function), forms no cycle.

    Why lazy ones too: an import moved into a function to dodge a cycle still ties the two modules together
    (the cycle is still there; it only fails later, at the call).
    """
    modules = {}
    for path in (ROOT / "lightning_frozenbn").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: sorted(_imports(path, name) & set(modules) - {name}) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_version_is_the_one_pyproject_declares():
    import tomllib

    import lightning_frozenbn

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert lightning_frozenbn.__version__ == declared
