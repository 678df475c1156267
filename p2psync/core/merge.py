"""Merging versions of one record.

Every op writes a *version* of a record and names the versions it saw and
replaces: its *bases* (entry IDs). The *heads* of a record are the versions no
other version names as a base. One head is the normal case. More than one head
means writers changed the record without seeing each other: a **conflict**.

The winner among the heads is the greatest ``(hlc, author)``; it is the
record's value everywhere. The other heads (the losers) are kept and listed
until an op names all of them as bases (``resolve``).

Because an op is applied only after every base it names (causal delivery), the
head set after applying a set of versions depends only on that set, never on
the order of arrival: ``heads = versions - {every base named}``. That is what
makes any two agents holding the same entries hold the same records and the
same conflict list.

A base that names an applied entry without a version of this record simply
supersedes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple


class Version(NamedTuple):
    """One version of a record: who wrote it, when, and its op payload."""

    entry: bytes
    hlc: int
    author: bytes
    payload: bytes
    deleted: bool

    @property
    def rank(self) -> tuple[int, bytes]:
        """Order of precedence: the greatest rank wins."""
        return (self.hlc, self.author)


def merge(heads: Sequence[Version], new: Version, bases: Collection[bytes]) -> list[Version]:
    """Return the head set after applying ``new`` (which names ``bases``).

    The result is sorted by rank, greatest first: element 0 is the winner.
    """
    kept = [head for head in heads if head.entry not in bases and head.entry != new.entry]
    kept.append(new)
    kept.sort(key=lambda version: version.rank, reverse=True)
    return kept
