"""The log format of every p2psync process (`p2psync run`, `relay serve`, any
command): one line per record, whatever a peer put in it.

A log line carries text other parties chose: a peer's handshake name, its
``Bye`` reason (up to 500 characters), a relay's answers, names in mDNS adverts.
:class:`SafeFormatter` escapes control and reordering characters in the message
(``\\n`` becomes ``\\u000a``, an escape sequence ``\\u001b[31m``) as
:func:`~p2psync.cli.output.safe` does in what the CLI prints, so no one can
forge a line, hide one or drive the terminal that reads the log. A traceback
(logged with ``exc_info``) keeps its own lines, each escaped alike and indented
by ``| ``: its last line carries the exception's text, which a peer may have
chosen, so no line of it can pass for a record of its own.
"""

from __future__ import annotations

import logging
from typing import Any

from p2psync.cli.output import safe

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    """Each line of a traceback escaped and marked as a continuation. Split on
    ``\n`` only: ``safe`` escapes every other line break."""
    return "\n".join("| " + safe(line) for line in text.split("\n"))


def configure(level: int) -> None:
    """The root logger's handler, as ``logging.basicConfig`` makes it, with the
    safe formatter."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(SafeFormatter(FORMAT))
