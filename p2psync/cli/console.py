"""`p2psync console`: a one-time link that logs a browser in to the running
agent's web console (``docs/http-api.md``, "Web console")."""

from __future__ import annotations

import click

from p2psync import home as home_mod
from p2psync.cli.context import State, pass_state
from p2psync.clock import now_ms
from p2psync.errors import AgentNotRunning, StateError
from p2psync.http.keys import LINK_TTL_MS, api_key, console_link_token
from p2psync.net import agentsockets


@click.command()
@pass_state
def console(state: State) -> None:
    """Print a one-time link to the running agent's web console (it works once,
    for 10 minutes; anyone who can read this home's files can make one)."""
    home_mod.check_home(state.home)
    try:
        running = agentsockets.request(state.home, {"op": "status"}, 3)
    except (AgentNotRunning, OSError, ValueError):
        raise AgentNotRunning(
            "the agent is not running here: start it with `p2psync run` (the console is "
            "part of it)"
        ) from None
    urls = running.get("http") or []
    if not urls:
        raise StateError(
            "the running agent does not serve the HTTP API (it was started with --no-http); "
            "restart it without"
        )
    key = api_key(state.home)
    token = console_link_token(key, now_ms())
    click.echo(f"{urls[0]}/console/login?once={token}")
    click.echo(
        f"(open it in a browser on this machine within {LINK_TTL_MS // 60_000} minutes; "
        "it works once)",
        err=True,
    )


COMMANDS = (console,)
