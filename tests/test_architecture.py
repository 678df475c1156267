"""Architecture rules: the pure core imports no I/O (no sockets, files, clocks,
randomness or UI), and lower layers never import higher ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import p2psync

CORE = Path(p2psync.__file__).parent / "core"
FORBIDDEN = {
    "asyncio",
    "click",
    "datetime",
    "io",
    "os",
    "pathlib",
    "random",
    "secrets",
    "select",
    "selectors",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "threading",
    "time",
    "trio",
    "zeroconf",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_modules_import_no_io() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 5
    offenders = {
        path.name: sorted(imported_modules(path) & FORBIDDEN)
        for path in modules
        if imported_modules(path) & FORBIDDEN
    }
    assert offenders == {}


def test_core_depends_only_on_core_and_errors() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("p2psync")
            ):
                assert node.module.startswith(("p2psync.core", "p2psync.errors")), (
                    f"{path.name} imports {node.module}"
                )


def test_the_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import os\nfrom trio import open_nursery\nimport sqlite3 as db\n")
    assert imported_modules(sample) & FORBIDDEN == {"os", "trio", "sqlite3"}


#: Which layers each package may import (the layers below it, never above).
LAYERS = {
    "store": ("p2psync.core", "p2psync.errors", "p2psync.store"),
    "net": ("p2psync.core", "p2psync.errors", "p2psync.store", "p2psync.net", "p2psync.api",
            "p2psync.pairing", "p2psync.home"),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_lower_layers_do_not_import_higher_ones(package: str) -> None:
    root = CORE.parent / package
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "p2psync."
            ):
                assert node.module.startswith(LAYERS[package]), (
                    f"{package}/{path.name} imports {node.module}"
                )


def test_the_command_line_starts_without_trio_or_zeroconf() -> None:
    """Record commands start in ~half the time without the networking stack."""
    code = "import sys, p2psync.cli.main; print(sorted({'trio', 'zeroconf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
