"""A relay node's home folder: its identity, settings, admission list and mailbox.

Resolution order: ``--home``, else ``$P2PSYNC_RELAY_HOME``, else
``$XDG_DATA_HOME/p2psync-relay`` (``~/.local/share/p2psync-relay``).

Layout::

    HOME/identity.key      Ed25519 seed, as an agent's (mode 0600, never overwritten)
    HOME/relay.json        settings: name, mailbox limits, session caps, and the mailbox
                           store when it is not the SQLite file (``relay init --store``)
    HOME/admission.json    allowed device IDs and admission tokens (mode 0600)
    HOME/mailbox.sqlite    the blind mailbox (``store/mailbox.py``), unless ``store`` names
                           a PostgreSQL database (``store/pgmailbox.py``: then the mailbox,
                           the admission list and the other nodes are there)
    HOME/state.json        written every second while ``relay serve`` runs
    HOME/relay.log         operator actions: allow, deny, tokens, purges, admissions

A relay home is never an agent's: an agent's home holds ``store.sqlite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2psync import clock
from p2psync import home as agent_home
from p2psync.core.handshake import MAX_NAME_CHARS
from p2psync.core.identity import Identity
from p2psync.core.mailbox import Limits
from p2psync.errors import HomeError, UsageError
from p2psync.store.store import STORE_FILE

SETTINGS_FILE = agent_home.RELAY_SETTINGS
ADMISSION_FILE = "admission.json"
MAILBOX_FILE = "mailbox.sqlite"
STATE_FILE = "state.json"
LOG_FILE = "relay.log"
ADMISSION_LOCK = "admission.lock"
SERVE_LOCK = "serve.lock"
_KIND = "p2psync-relay"


@dataclass(frozen=True)
class Caps:
    """What one relay process allows its connections (``relay.json``, ``caps``)."""

    handshake_seconds: float = 10.0  # handshake and Hello, from accept
    idle_seconds: float = 300.0  # an admitted session silent this long is closed
    half_open_per_address: int = 8  # connections not admitted yet, per source address
    half_open_total: int = 256
    sessions_total: int = 2000
    sessions_per_device: int = 4  # a newer session closes the oldest beyond this
    bytes_per_second_per_connection: int = 8 * 1024 * 1024  # inbound
    bytes_per_second_total: int = 64 * 1024 * 1024  # inbound, every connection together
    sweep_seconds: float = 30.0  # how often expired envelopes are dropped
    splices_per_device: int = 8  # live splices (and, apart, invitations) per device
    splices_total: int = 256  # live splices and open invitations, all devices
    connects_per_second: float = 2.0  # splice requests per session (a burst of 10)

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"relay cap {name} must be a positive number")


@dataclass(frozen=True)
class RelayHome:
    path: Path
    identity: Identity
    name: str
    limits: Limits
    caps: Caps
    #: the PostgreSQL database (a libpq connection string or URI; "" with the
    #: ``PG*`` variables too) when the mailbox is not the SQLite file; None: SQLite
    store: str | None = None

    @property
    def mailbox_path(self) -> Path:
        return self.path / MAILBOX_FILE


def resolve(home: str | os.PathLike[str] | None = None) -> Path:
    if home is not None and str(home) != "":
        return Path(home).expanduser()
    env = os.environ.get("P2PSYNC_RELAY_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "p2psync-relay"


def init(
    path: Path, name: str | None = None, *, store: str | None = None, like: Path | None = None
) -> RelayHome:
    """A new relay home with a fresh identity and the default settings; with
    ``like``, another node of the relay in that home: its identity, name, limits,
    caps and store (which must be PostgreSQL: nodes share the database)."""
    if name is not None and (
        not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable()
    ):
        raise UsageError(f"a relay name is 1-{MAX_NAME_CHARS} printable characters")
    if (path / agent_home.KEY_FILE).exists():
        kind = "an agent's" if (path / STORE_FILE).exists() else "a"
        raise HomeError(f"{path} already holds {kind} p2psync identity; use another --home")
    model = load(like) if like is not None else None
    if model is not None:
        if model.store is None:
            raise HomeError(
                f"the relay at {like} keeps its mailbox in SQLite, which one node alone "
                "can use; nodes of one relay share one PostgreSQL database (docs/relay.md, "
                "\"Several relay nodes\")"
            )
        name = name or model.name
        store = store if store is not None else model.store
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # an existing folder too
        settings: dict[str, Any] = {
            "kind": _KIND,
            "name": name,
            "limits": dataclasses.asdict(model.limits if model else Limits()),
            "caps": dataclasses.asdict(model.caps if model else Caps()),
        }
        if store is not None:
            settings["store"] = store
        _write_json(path / SETTINGS_FILE, settings)
        key = path / agent_home.KEY_FILE
        if model is not None:  # last: marks done
            agent_home._write_new(key, (model.path / agent_home.KEY_FILE).read_bytes())
            identity = agent_home.read_identity(key)
        else:
            identity = agent_home.write_identity(key)
    except OSError as exc:
        raise HomeError(f"cannot create the relay home at {path}: {exc.strerror or exc}") from exc
    return RelayHome(
        path,
        identity,
        name or f"relay-{identity.short_id}",
        model.limits if model else Limits(),
        model.caps if model else Caps(),
        store,
    )


def set_store(home: RelayHome, store: str) -> RelayHome:
    """Record ``store`` in the home's settings (``relay serve --store`` on a home
    that had none)."""
    settings = _read_json(home.path / SETTINGS_FILE)
    settings["store"] = store
    try:
        _write_json(home.path / SETTINGS_FILE, settings)
    except OSError as exc:
        raise HomeError(f"cannot write {home.path / SETTINGS_FILE}: {exc.strerror or exc}") from exc
    return dataclasses.replace(home, store=store)


def load(path: Path) -> RelayHome:
    """A relay home as set up by ``relay init``; clear errors for anything else."""
    quoted = shlex.quote(str(path))
    if not (path / SETTINGS_FILE).exists():
        if (path / STORE_FILE).exists():
            raise HomeError(
                f"{path} is an agent's home, not a relay's; a relay has its own "
                "(`p2psync relay init --home PATH`)"
            )
        raise HomeError(f"no relay home at {path}; run `p2psync relay init --home {quoted}`")
    if not (path / agent_home.KEY_FILE).exists():
        raise HomeError(f"{path} has no identity.key; run `p2psync relay init --home {quoted}`")
    identity = agent_home.read_identity(path / agent_home.KEY_FILE)
    settings = _read_json(path / SETTINGS_FILE)
    if settings.get("kind") != _KIND:
        raise HomeError(f"{path / SETTINGS_FILE} is not a relay's settings file")
    name = settings.get("name")
    store = settings.get("store")
    if store is not None and not isinstance(store, str):
        raise HomeError(f"{path / SETTINGS_FILE}: store is not a text")
    if store:
        from p2psync.store.pgpool import check_conninfo  # noqa: PLC0415

        try:
            check_conninfo(store)
        except UsageError as exc:
            raise HomeError(f"{path / SETTINGS_FILE}: store: {exc}") from None
    return RelayHome(
        path,
        identity,
        name if isinstance(name, str) and name else f"relay-{identity.short_id}",
        _settings(Limits, settings.get("limits"), path),
        _settings(Caps, settings.get("caps"), path),
        store,
    )


def _settings(kind: Any, raw: object, path: Path) -> Any:
    """``kind`` (Limits or Caps) from its JSON object: unknown or bad keys are errors
    (a typo must not silently leave a default in force)."""
    if raw is None:
        return kind()
    if not isinstance(raw, dict):
        raise HomeError(f"{path / SETTINGS_FILE}: {kind.__name__.lower()} is not an object")
    known = {f.name: f.type for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise HomeError(f"{path / SETTINGS_FILE}: unknown setting {', '.join(unknown)}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HomeError(f"{path / SETTINGS_FILE}: {key} must be a number")
        if known[key] == "int" and not isinstance(value, int):
            raise HomeError(f"{path / SETTINGS_FILE}: {key} must be a whole number")
    try:
        return kind(**raw)
    except UsageError as exc:
        raise HomeError(f"{path / SETTINGS_FILE}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HomeError(f"{path} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise HomeError(f"{path} is not a JSON object")
    return data


def _write_json(path: Path, data: object, mode: int = 0o600) -> None:
    """Replace ``path`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    agent_home._fsync_dir(path.parent)


def log_action(path: Path, text: str) -> None:
    """Append one operator action to ``relay.log`` (time, then the text)."""
    stamp = clock.now_ms()
    with (path / LOG_FILE).open("a") as out:
        out.write(f"{stamp} {text}\n")
        out.flush()
        os.fsync(out.fileno())
