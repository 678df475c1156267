"""What every CLI command shares: the resolved options and the home they name."""

from __future__ import annotations

from pathlib import Path

import click

from p2psync import api
from p2psync import home as home_mod


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


pass_state = click.make_pass_decorator(State)
