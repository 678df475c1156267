"""What every CLI command shares: the resolved options and the home they name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from p2psync import api
from p2psync import home as home_mod

F = TypeVar("F", bound=Callable[..., Any])

HOME_HELP = "Agent home folder (default: $P2PSYNC_HOME, else the XDG data dir)."
RELAY_HOME_HELP = (
    "Relay home folder (default: $P2PSYNC_RELAY_HOME, else ~/.local/share/p2psync-relay)."
)


class State:
    """What the top-level options decided, handed to every command."""

    def __init__(self, home: str | None, debug: bool) -> None:
        self.home_arg = home
        self.debug = debug

    @property
    def home(self) -> Path:
        return home_mod.resolve(self.home_arg)

    def open(self) -> api.Database:
        return api.open(self.home)


def _late_home(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--home`` given after a command name: the same as before it."""
    if value is None or ctx.resilient_parsing:
        return
    state = ctx.find_object(State)
    if state is None:  # pragma: no cover - every command runs under the main group
        raise click.UsageError("--home needs the p2psync command group", ctx)
    if state.home_arg is not None and state.home_arg != value:
        raise click.UsageError(
            f"--home is given twice ({state.home_arg!r} and {value!r}); give it once", ctx
        )
    state.home_arg = value


def home_option(function: F, help: str = HOME_HELP) -> F:
    """Accept ``--home PATH`` here too, as after the top-level command."""
    return click.option(
        "--home",
        metavar="PATH",
        expose_value=False,
        callback=_late_home,
        help=help,
    )(function)


_pass = click.make_pass_decorator(State)


def pass_state(function: F) -> F:
    """Hand the command the :class:`State`; it also takes ``--home`` after its name."""
    return home_option(_pass(function))  # type: ignore[return-value]


def pass_relay_state(function: F) -> F:
    """As :func:`pass_state`, for the relay node's commands: ``--home`` names a
    relay's home."""
    return home_option(_pass(function), RELAY_HOME_HELP)  # type: ignore[return-value]
