"""The ``p2psync`` command line.

The CLI is the only place that prints or picks exit codes: 0 success, 2 a usage
error (a malformed command line: :class:`~p2psync.errors.UsageError` or click's
own), 1 any other error (not found, refused in the current state, failed),
explained in one sentence on stderr. No tracebacks unless ``--debug`` is given.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

import click

from p2psync import __version__
from p2psync import home as home_mod
from p2psync.cli import (
    agent,
    bundle,
    console,
    logs,
    output,
    pair,
    peers,
    records,
    relay,
    rule,
    service,
    watch,
)
from p2psync.cli.context import HOME_HELP, State, pass_state
from p2psync.cli.logformat import configure
from p2psync.cli.terms import parse_duration
from p2psync.errors import AgentNotRunning, P2PSyncError, UsageError
from p2psync.net import agentsockets


class Group(click.Group):
    """Turns p2psync errors into one sentence and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except UsageError as exc:
            fail(str(exc), code=2)
        except P2PSyncError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(1)
        except Exception as exc:
            state = ctx.find_object(State)
            if state is not None and state.debug:
                raise
            fail(
                f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for details)"
            )


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one sentence and exit. The sentence may quote a peer or a relay (a
    ``Bye`` reason, a name): escaped as every output is."""
    click.echo(f"p2psync: {output.safe(message)}", err=True)
    sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", metavar="PATH", help=HOME_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(__version__, prog_name="p2psync")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """p2psync: keep business records in step between sites, peer to peer."""
    configure(logging.DEBUG if debug else logging.WARNING)  # peers' words escaped
    os.umask(0o077)  # what a home holds (records, keys, sockets, logs): its user's alone
    ctx.obj = State(home, debug)


@cli.command()
@click.option("--name", help="Display name of this site (default: derived from the ID).")
@pass_state
def init(state: State, name: str | None) -> None:
    """Create a home with a new identity; prints the device ID first."""
    created = home_mod.init(state.home, name)
    click.echo(created.identity.device_id)
    click.echo(f"initialised {created.name!r} at {created.path}")


@cli.command(name="id")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def show_id(state: State, as_json: bool) -> None:
    """Show this agent's device ID."""
    loaded = home_mod.load(state.home)
    if as_json:
        output.emit_json(
            {
                "device_id": loaded.identity.device_id,
                "short_id": loaded.identity.short_id,
                "name": loaded.name,
                "home": str(loaded.path),
            }
        )
    else:
        click.echo(loaded.identity.device_id)


@cli.command()
@click.option(
    "--max-clock-ahead",
    metavar="DURATION",
    help="Refuse entries whose clock is further ahead of this machine's than this "
    "(2m to 1d; default 10m). A running agent takes it at its next start.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_state
def settings(state: State, max_clock_ahead: str | None, as_json: bool) -> None:
    """Show this site's settings, or change one."""
    if max_clock_ahead is not None:
        seconds = parse_duration(max_clock_ahead, "--max-clock-ahead")
        low, high = home_mod.CLOCK_AHEAD_RANGE_S
        if not low <= seconds <= high or seconds != int(seconds):
            raise UsageError(
                f"--max-clock-ahead: {max_clock_ahead!r} is out of range: give "
                f"{low // 60}m to {high // 86_400}d in whole seconds"
            )
        home_mod.check_home(state.home)  # (not the rest of load: a bad value can be set again)
        home_mod.set_clock_ahead(state.home, int(seconds))
    loaded = home_mod.load(state.home)
    ahead = loaded.max_clock_ahead_ms // 1000
    running = False
    if max_clock_ahead is not None:
        try:
            agentsockets.request(state.home, {"op": "status"}, 3)
            running = True
        except (AgentNotRunning, OSError, ValueError):
            pass
    if as_json:
        output.emit_json({"name": loaded.name, "max_clock_ahead_s": ahead})
    else:
        click.echo(f"name: {output.safe(loaded.name)}")
        click.echo(f"max clock ahead: {ahead} s (entries further ahead are refused)")
    if running:
        click.echo(
            "the running agent goes on with the bound it started with until it restarts "
            "(stop it and run `p2psync run` again)",
            err=True,
        )


_GROUPS = (records, watch, logs, pair, rule, peers, agent, bundle, relay, console, service)
for _command in (command for group in _GROUPS for command in group.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="p2psync")
