"""Running a server in the foreground until SIGINT or SIGTERM (`run`, `relay serve`)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import click
import trio

from p2psync.errors import P2PSyncError

Serve = Callable[..., Awaitable[Any]]  # serve(task_status=...) reports its addresses


def run_until_signal(serve: Serve, more: Callable[[], list[str]] | None = None) -> None:
    """Start ``serve`` under trio, print ``listening on ADDRESS`` for each address it
    reports, and stop it cleanly on SIGINT or SIGTERM (caught from the start: a
    signal while starting stops it too). A start-up failure that trio's nurseries
    wrapped in exception groups comes out as the p2psync error it is. ``more``
    gives lines to print after those (what else is served)."""

    async def stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for signum in signals:
            logging.getLogger("p2psync").info("stopping on %s", signal.Signals(signum).name)
            scope.cancel()
            return

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signal, signals, nursery.cancel_scope)
                listening = await nursery.start(serve)
                for address in listening:
                    click.echo(f"listening on {address}")
                for line in more() if more is not None else []:
                    click.echo(line)
                sys.stdout.flush()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        error = sole_error(group)
        if error is None:
            raise  # anything else is an internal error (traceback with --debug)
        raise error from error.__cause__


def sole_error(group: BaseExceptionGroup[BaseException]) -> P2PSyncError | None:
    """The p2psync error that trio's nurseries wrapped, nested, in exception groups
    (a start-up failure: a port in use, an address not here), if it is all they hold."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], P2PSyncError):
        return leaves[0]
    return None
