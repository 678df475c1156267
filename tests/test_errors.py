"""The one exception tree: every exception class p2psync defines is in
``p2psync.errors``, under :class:`P2PSyncError`, drawn in its docstring; the
sender's faults among refused entries are told by type; the CLI's exit codes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import click
import pytest
from click.testing import CliRunner

import p2psync
from p2psync import errors
from p2psync.cli.main import Group
from p2psync.errors import (
    ChainError,
    DecodeError,
    EntryError,
    ForkError,
    HostileEntry,
    P2PSyncError,
    RemoteProtocolError,
    RuleViolationError,
    SignatureError,
)

pytestmark = pytest.mark.pure

#: What net/sync.py listed as proving the sender hostile before the tree said so.
OLD_HOSTILE = (DecodeError, SignatureError, ChainError, ForkError, RuleViolationError)


def p2psync_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class reachable in a module of p2psync, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(p2psync.__path__, "p2psync."):
        if info.name == "p2psync.__main__":  # runs the CLI on import
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("p2psync"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


#: One class of the drawing: its indentation, then its name (marks like ¹ after it).
TREE_LINE = re.compile(r"^ {4}((?:[│ ]*[├└]── )?)([A-Z][A-Za-z0-9]*)", re.MULTILINE)


def drawn() -> list[str]:
    """The class names in the tree drawing of the errors module's docstring."""
    assert errors.__doc__ is not None
    return [name for _, name in TREE_LINE.findall(errors.__doc__)]


def test_every_exception_class_is_in_the_errors_module() -> None:
    found = p2psync_exceptions()
    assert len(found) > 30
    assert [name for name in found if not name.startswith("p2psync.errors.")] == []


def test_every_exception_class_is_a_p2psync_error() -> None:
    found = p2psync_exceptions()
    assert [name for name, cls in found.items() if not issubclass(cls, P2PSyncError)] == []


def test_the_docstring_draws_the_whole_tree() -> None:
    defined = {cls.__name__ for cls in p2psync_exceptions().values()}
    assert drawn()[0] == "P2PSyncError"
    assert set(drawn()) == defined


def test_the_drawing_shows_each_class_under_its_parents() -> None:
    """Each drawn class sits under a class it derives from (two-parent classes are
    drawn once under each parent)."""
    assert errors.__doc__ is not None
    stack: list[tuple[int, str]] = []
    for prefix, name in TREE_LINE.findall(errors.__doc__):
        depth = len(prefix)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parent = getattr(errors, stack[-1][1])
            assert issubclass(getattr(errors, name), parent), f"{name} under {parent.__name__}"
        stack.append((depth, name))


def test_hostile_entries_are_told_by_type() -> None:
    entry_errors = [  # HostileEntry itself is never raised: its subclasses are
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, EntryError) and cls is not HostileEntry
    ]
    assert len(entry_errors) > 10
    for cls in entry_errors:
        assert issubclass(cls, HostileEntry) == issubclass(cls, OLD_HOSTILE), cls.__name__
        error = cls("reason")
        assert isinstance(error, HostileEntry) == isinstance(error, OLD_HOSTILE)
    assert issubclass(HostileEntry, RemoteProtocolError)


def test_remote_and_local_faults_are_apart() -> None:
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.LocalProtocolError):
            assert not issubclass(cls, RemoteProtocolError), cls.__name__
    assert issubclass(errors.DecryptError, errors.HandshakeError)
    assert issubclass(errors.IdentityMismatch, RemoteProtocolError)
    assert issubclass(errors.LocalHandshakeError, errors.HandshakeError)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.UsageError("malformed"), 2),
        (errors.InvalidRecord("bad key"), 2),
        (errors.NotFoundError("no such thing"), 1),
        (errors.StateError("refused"), 1),
        (errors.AgentNotRunning("/tmp/control.sock"), 1),
        (errors.AgentSocketError("not private"), 1),
        (errors.RemoteProtocolError("bad message"), 1),
        (errors.DecodeError("not CBOR"), 1),
    ],
)
def test_the_cli_exits_2_for_usage_errors_and_1_for_the_rest(
    error: P2PSyncError, code: int
) -> None:
    @click.group(cls=Group)
    def cli() -> None:
        pass

    @cli.command()
    def fail() -> None:
        raise error

    result = CliRunner().invoke(cli, ["fail"])
    assert result.exit_code == code
    assert result.output == f"p2psync: {error}\n"
