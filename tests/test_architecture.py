"""The layer contract: p2psync's modules in rings, each importing only from its own
ring and the rings below, never above (no exceptions); no import cycles, not even
through ``TYPE_CHECKING``; the pure core imports no I/O (no sockets, files,
clocks, randomness or UI).

Every module must be in exactly one ring: a new module is placed here on purpose.
The picture of the rings, with the rings each one actually uses:

    python -m pytest tests/test_architecture.py -q -s
    python tests/test_architecture.py
"""

from __future__ import annotations

import ast
import fnmatch
import graphlib
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import p2psync

pytestmark = pytest.mark.pure

PACKAGE = Path(p2psync.__file__).parent

#: The rings, bottom first: (name, what lives there, module patterns).
RINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "core",
        "the pure core (core/ imports only core/ and errors), the error tree, the clock",
        ("p2psync.errors", "p2psync.clock", "p2psync.core", "p2psync.core.*"),
    ),
    (
        "store",
        "SQLite store; the home folder (key, config, store path)",
        ("p2psync.store", "p2psync.store.*", "p2psync.home"),
    ),
    (
        "net",
        "adapters below pairing: streams, dialling, the store from trio, mDNS, session parts",
        (
            "p2psync.net.address",
            "p2psync.net.adverts",
            "p2psync.net.agentsockets",
            "p2psync.net.dial",
            "p2psync.net.discovery",
            "p2psync.net.forks",
            "p2psync.net.halfopen",
            "p2psync.net.stats",
            "p2psync.net.storeio",
            "p2psync.net.transport",
            "p2psync.net.relayclient",
            "p2psync.net.splice",
        ),
    ),
    (
        "relay",
        "the relay node: its home, admission, sessions with agents, the mailbox service",
        ("p2psync.relay", "p2psync.relay.*"),
    ),
    (
        "pairing",
        "rules as this agent lives them: propose, accept, reject, revoke, invite, join",
        ("p2psync.pairing",),
    ),
    (
        "sessions",
        "sync sessions over the network, with the pair's rules; one-shot syncs",
        ("p2psync.net.link", "p2psync.net.sync", "p2psync.net.peernote", "p2psync.net.oneshot"),
    ),
    (
        "mail",
        "the agent's side of the mailbox: bundles, receipts, the delivery ledger, bundle files",
        ("p2psync.mail", "p2psync.mail.*"),
    ),
    ("api", "the Python API: p2psync.open(home) -> Database", ("p2psync", "p2psync.api")),
    (
        "views",
        "what the CLI and the HTTP API say about the site, as plain data",
        ("p2psync.views", "p2psync.views.*"),
    ),
    (
        "agent",
        "the running agent: listeners, dialers, connections, local sockets, status",
        ("p2psync.agent", "p2psync.agent.*"),
    ),
    (
        "http",
        "the agent's local HTTP API and web console (Starlette on Hypercorn's trio worker)",
        ("p2psync.http", "p2psync.http.*"),
    ),
    (
        "cli",
        "the command line and the demo (the only places that print)",
        ("p2psync.__main__", "p2psync.cli", "p2psync.cli.*", "p2psync.demo"),
    ),
)

#: What the pure core may not import.
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


# ---------------------------------------------------------------- the checker


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def ring_of(module: str) -> int | None:
    """Which ring ``module`` is in (its index, bottom 0), None when in none."""
    found = [
        index
        for index, (_, _, patterns) in enumerate(RINGS)
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)
    ]
    return found[0] if len(found) == 1 else None


def imports(path: Path, known: Iterable[str], root: Path = PACKAGE) -> set[str]:
    """The p2psync modules ``path`` imports (at any depth, TYPE_CHECKING included):
    ``from p2psync.x import y`` is ``p2psync.x.y`` when that is a module, else
    ``p2psync.x``."""
    names = set(known)
    here = module_name(path, root).split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                up = node.level - (1 if path.name == "__init__.py" else 0)
                package = here[: len(here) - up]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in names else base)
    return {name for name in found if name == "p2psync" or name.startswith("p2psync.")}


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the p2psync modules it imports."""
    found = modules(root)
    return {name: imports(path, found, root) - {name} for name, path in found.items()}


def violations(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import of a module in a higher ring, and every module in no ring."""
    problems = []
    for module, imported in sorted(edges.items()):
        ring = ring_of(module)
        if ring is None:
            problems.append(f"{module} is in no ring (or in several): place it in RINGS")
            continue
        for other in sorted(imported):
            theirs = ring_of(other)
            if theirs is not None and theirs > ring:
                problems.append(
                    f"{module} ({RINGS[ring][0]}) imports {other} ({RINGS[theirs][0]})"
                )
    return problems


def cycle(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Modules that import one another in a circle (empty: none)."""
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return []


def core_offenders(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Core modules that import I/O (:data:`FORBIDDEN`), or p2psync beyond core/ and
    errors (the clock included: time is passed in)."""
    known = modules(root)
    offenders = {}
    for path in sorted((root / "core").glob("*.py")):
        outside: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                outside.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                outside.add(node.module.split(".")[0])
        bad = outside & FORBIDDEN
        bad |= {
            name
            for name in imports(path, known, root)
            if not name.startswith(("p2psync.core", "p2psync.errors"))
        }
        if bad:
            offenders[path.name] = sorted(bad)
    return offenders


def picture(edges: Mapping[str, Iterable[str]]) -> str:
    """The rings, top first: each with what lives there, the rings below that it
    actually uses, and its modules (``p2psync.`` left out)."""
    lines = []
    for index in reversed(range(len(RINGS))):
        name, job, _ = RINGS[index]
        members = sorted(m for m in edges if ring_of(m) == index)
        uses = sorted(
            {
                ring
                for m in members
                for other in edges[m]
                if (ring := ring_of(other)) is not None and ring < index
            },
            reverse=True,
        )
        short = ", ".join(m.removeprefix("p2psync.") for m in members)
        lines.append(f"{index} {name:<9}{job}")
        lines.append(f"{'':11}uses: {', '.join(RINGS[r][0] for r in uses) or 'nothing'}")
        lines.extend(textwrap.wrap(short, 88, initial_indent=" " * 11, subsequent_indent=" " * 11))
    return "\n".join(lines)


# ---------------------------------------------------------------- the contract


def test_every_module_is_in_one_ring_and_imports_nothing_above_it() -> None:
    assert violations(graph()) == []


def test_no_module_imports_itself_through_others() -> None:
    assert cycle(graph()) == []


def test_the_layer_picture() -> None:
    """Printed with ``-s``: the rings as the code has them now."""
    drawn = picture(graph())
    print("\n" + drawn)
    assert [line.split()[:2] for line in drawn.splitlines() if line[:1].isdigit()] == [
        [str(index), RINGS[index][0]] for index in reversed(range(len(RINGS)))
    ]


def test_core_modules_import_no_io_and_only_core_and_errors() -> None:
    assert len(list((PACKAGE / "core").glob("*.py"))) >= 5
    assert core_offenders() == {}


def test_the_checker_sees_upward_imports_and_unplaced_modules(tmp_path: Path) -> None:
    root = tmp_path / "p2psync"
    (root / "net").mkdir(parents=True)
    (root / "core").mkdir()
    (root / "__init__.py").write_text("")
    (root / "core" / "x.py").write_text("from p2psync.net import link\nimport os\n")
    (root / "net" / "link.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p2psync import api\n"
    )
    (root / "net" / "relay.py").write_text("from p2psync.core import x\n")
    (root / "api.py").write_text("")
    edges = {
        module_name(path, root): imports(path, modules(root), root) - {module_name(path, root)}
        for path in root.rglob("*.py")
    }
    assert edges["p2psync.core.x"] == {"p2psync.net.link"}
    assert violations(edges) == [
        "p2psync.core.x (core) imports p2psync.net.link (sessions)",
        "p2psync.net.link (sessions) imports p2psync.api (api)",
        "p2psync.net.relay is in no ring (or in several): place it in RINGS",
    ]
    (root / "api.py").write_text("from p2psync.net.relay import x\n")
    circle = cycle(graph(root))
    assert circle[0] == circle[-1] and set(circle) == {
        "p2psync.api", "p2psync.net.relay", "p2psync.core.x", "p2psync.net.link"
    }
    (root / "core" / "y.py").write_text("import time\nfrom p2psync import clock\n")
    (root / "clock.py").write_text("")
    assert core_offenders(root) == {
        "x.py": ["os", "p2psync.net.link"],
        "y.py": ["p2psync.clock", "time"],
    }


@pytest.mark.process
def test_the_command_line_starts_without_trio_or_zeroconf() -> None:
    """Record commands start in ~half the time without the networking stack."""
    code = "import sys, p2psync.cli.main; print(sorted({'trio', 'zeroconf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.process
def test_api_imports_neither_the_agent_nor_trio() -> None:
    code = (
        "import sys, p2psync.api; "
        "print(sorted(m for m in sys.modules if m in ('trio', 'zeroconf') "
        "or m.startswith('p2psync.agent')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":
    print(picture(graph()))
    problems = violations(graph())
    print("\n".join(["", *problems]) if problems else "\nno import breaks the contract")
    sys.exit(1 if problems else 0)
