"""Authenticating runs of one author's entries cheaply.

Each entry's body names the ID of its predecessor, and an ID is the hash of
the predecessor's signed form, signature included. So in a *run* (entries of
one author with consecutive seqs, each naming the one before) a valid
signature on the **last** entry vouches, through the hash links, for every
entry before it: forging any of them would need a BLAKE2b-256 second preimage.
:func:`authenticate` therefore checks links for the whole batch and one
Ed25519 signature per run, falling back to one check per entry only when a
run's last signature fails (to keep the valid prefix of a damaged run).

Whether a run attaches to what the store already holds, and whether an entry
conflicts with a stored one (a fork), is decided when applying; entries that
come out of here are known to be what their author signed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from p2psync.core.entry import Entry
from p2psync.errors import ChainError, EntryError, SignatureError


@dataclass
class Authenticated:
    """Outcome of :func:`authenticate` for one author's batch."""

    entries: list[Entry] = field(default_factory=list)
    rejected: list[tuple[Entry, EntryError]] = field(default_factory=list)
    signatures_checked: int = 0


def _seq(entry: Entry) -> int:
    return entry.seq


def split_runs(entries: Iterable[Entry]) -> list[list[Entry]]:
    """Sort one author's entries by seq, drop exact duplicates, cut into linked runs."""
    unique = {entry.id: entry for entry in entries}
    ordered = sorted(unique.values(), key=_seq)
    runs: list[list[Entry]] = []
    for entry in ordered:
        if runs:
            last = runs[-1][-1]
            if entry.seq == last.seq + 1 and entry.prev == last.id:
                runs[-1].append(entry)
                continue
        runs.append([entry])
    return runs


def authenticate(entries: Iterable[Entry]) -> Authenticated:
    """Check signatures (one per run) and clock order of one author's entries."""
    result = Authenticated()
    for run in split_runs(entries):
        result.signatures_checked += 1
        if run[-1].signature_valid():
            valid = run
        else:
            valid = []
            for index, entry in enumerate(run):
                if index < len(run) - 1:
                    result.signatures_checked += 1
                    if entry.signature_valid():
                        valid.append(entry)
                        continue
                result.rejected.append(
                    (entry, SignatureError(f"entry {entry.seq}: signature does not verify"))
                )
                _reject_rest(result, run[index + 1 :], entry)
                break
        _check_clock(result, valid)
    return result


def _check_clock(result: Authenticated, run: list[Entry]) -> None:
    for index, entry in enumerate(run):
        if index and entry.hlc <= run[index - 1].hlc:
            result.rejected.append(
                (entry, ChainError(f"entry {entry.seq}: clock does not advance on its predecessor"))
            )
            _reject_rest(result, run[index + 1 :], entry)
            return
        result.entries.append(entry)


def _reject_rest(result: Authenticated, rest: list[Entry], bad: Entry) -> None:
    for entry in rest:
        result.rejected.append(
            (entry, ChainError(f"entry {entry.seq}: follows refused entry {bad.seq}"))
        )
