"""Record changes and versions as JSON-ready rows (``watch --json``, ``conflicts
--json``, the HTTP API); values stay in the value model (``views.values.to_json``
makes them JSON)."""

from __future__ import annotations

from typing import Any

from p2psync.core.identity import device_id
from p2psync.store.feed import RecordChange
from p2psync.store.records import VersionInfo


def change_json(change: RecordChange) -> dict[str, object]:
    return {
        "change": change.change,
        "collection": change.collection,
        "key": change.key,
        "value": change.value,
        "deleted": change.deleted,
        "author": device_id(change.author),
        "entry": change.entry.hex(),
        "hlc": change.hlc,
        "conflict": change.conflict,
    }


def version_row(version: VersionInfo) -> dict[str, Any]:
    """One version of a record: the value (None when deleted), who wrote it, when
    (its clock value) and in which entry."""
    return {
        "value": version.value,
        "deleted": version.deleted,
        "author": device_id(version.author),
        "hlc": version.hlc,
        "entry": version.entry.hex(),
    }
