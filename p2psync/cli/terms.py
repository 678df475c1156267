"""Sync-rule terms on the command line: the options that make them, accepting in
the acceptor's view, and durations like ``10m``."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from p2psync.core.rules import Direction, Mode, Route
from p2psync.errors import UsageError
from p2psync.views.rules import RuleOptions, accept_in_view

__all__ = ["RuleOptions", "accept_in_view", "parse_duration", "rule_options", "timeout_option"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


def rule_options(narrowing: bool = False) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """--collection/--direction/--mode/--route, handed to the command as one
    ``options`` argument (a :class:`RuleOptions`); defaults: everything, both,
    online, auto (``narrowing``: as proposed).

    The direction is always in this agent's view (whether it proposes or accepts);
    rules are signed in the proposer's view, see :func:`accept_in_view`."""

    def decorate(function: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(function)
        def command(
            *args: Any,
            collections: tuple[str, ...],
            direction: str | None,
            mode: str | None,
            route: str | None,
            **kwargs: Any,
        ) -> R:
            options = RuleOptions(collections, direction, mode, route)
            return function(*args, options=options, **kwargs)

        help_suffix = " (default: as proposed)" if narrowing else ""
        for option in reversed(
            [
                click.option(
                    "--collection",
                    "-c",
                    "collections",
                    multiple=True,
                    metavar="GLOB",
                    help=f"Collections the rule covers (repeatable; default *){help_suffix}.",
                ),
                click.option(
                    "--direction",
                    type=click.Choice([d.value for d in Direction]),
                    help="From this agent's view: send = this agent sends, receive = this "
                    f"agent receives, or both{help_suffix or ' (default both)'}.",
                ),
                click.option(
                    "--mode",
                    type=click.Choice([m.value for m in Mode]),
                    help=(
                        "online: live while both agents run; on-demand: on `p2psync sync` "
                        "(and on the live connection of an online rule with the same peer)."
                    ),
                ),
                click.option(
                    "--route",
                    type=click.Choice([r.value for r in Route]),
                    help="direct, relay or auto (default auto).",
                ),
            ]
        ):
            command = option(command)
        return command

    return decorate


def parse_duration(text: str, option: str | None = None) -> float:
    """Seconds in ``90s``, ``10m``, ``2h``, ``1d`` (a bare number is seconds);
    ``option`` names the option in the error."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        where = f"{option}: " if option else ""
        raise UsageError(f"{where}{text!r} is not a duration like 90s, 10m, 2h or 1d")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _seconds(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if not 0 < value < 1e6:  # NaN is refused too: it compares false
        raise click.BadParameter("give a number of seconds above 0, e.g. 30")
    return value


def timeout_option(default: float) -> Callable[[F], F]:
    """``--timeout SECONDS`` (above 0; a malformed value is a usage error)."""
    return click.option(
        "--timeout",
        type=float,
        default=default,
        show_default=True,
        callback=_seconds,
        help="Seconds to wait.",
    )
