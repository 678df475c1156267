"""The home folder: identity key, store and config of one agent.

Resolution order: an explicit path (``--home``), else ``$P2PSYNC_HOME``, else
``$XDG_DATA_HOME/p2psync`` (``~/.local/share/p2psync``).

Layout::

    HOME/identity.key   Ed25519 seed, JSON, mode 0600, never overwritten
    HOME/config.json    display name and settings
    HOME/store.sqlite   the store (plus -wal and -shm files)

:class:`Home` is a home as loaded (path, identity, name); :class:`OpenHome` is
what the layers below the API take of an open one (an open
:class:`p2psync.api.Database` is one).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from p2psync import clock
from p2psync.core import hlc
from p2psync.core.handshake import MAX_NAME_CHARS
from p2psync.core.identity import Identity
from p2psync.errors import HomeError, UsageError
from p2psync.store.store import STORE_FILE, Store

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
CONFIG_FILE = "config.json"
AGENT_FILE = "agent.json"  # written by a running agent: pid, listen addresses
RELAY_SETTINGS = "relay.json"  # marks a relay node's home (p2psync/relay/home.py)
_KEY_TYPE = "p2psync-ed25519-seed"


def resolve(home: str | os.PathLike[str] | None = None) -> Path:
    """The home folder to use, from the argument, the environment or XDG."""
    if home is not None and str(home) != "":
        return Path(home).expanduser()
    env = os.environ.get("P2PSYNC_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "p2psync"


#: config.json key: how far ahead of this machine's clock an entry's clock may be
#: (seconds) before it is refused as from the future (DESIGN: configurable)
CLOCK_AHEAD_KEY = "max_clock_ahead_s"
#: the range allowed. Below it an honest site's writes get refused: a clock follows
#: what it accepts up to hlc.MAX_ADOPT_AHEAD_MS ahead of its wall clock, and
#: ordinary drift comes on top (twice that limit leaves room). Above a day, a site
#: with a wildly wrong clock stamps entries that every later write must follow (a
#: write here is ordered after every clock it has seen).
CLOCK_AHEAD_RANGE_S = (2 * hlc.MAX_ADOPT_AHEAD_MS // 1000, 86_400)


@dataclass(frozen=True)
class Home:
    path: Path
    identity: Identity
    name: str
    max_clock_ahead_ms: int = hlc.DEFAULT_MAX_SKEW_MS

    @property
    def store_path(self) -> Path:
        return self.path / STORE_FILE


class OpenHome(Protocol):
    """A home with its store open, as pairing and the sessions use it: the signing
    identity, the name peers see in the handshake, and the store."""

    @property
    def identity(self) -> Identity: ...

    @property
    def name(self) -> str: ...

    @property
    def store(self) -> Store: ...


def init(path: Path, name: str | None = None) -> Home:
    """Create a new home with a fresh identity; refuse if one exists."""
    if name is not None and (
        not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable()
    ):
        raise UsageError(
            f"a site name is 1-{MAX_NAME_CHARS} printable characters (no tabs, newlines "
            "or invisible characters); peers see it in every handshake"
        )
    key_path = path / KEY_FILE
    if key_path.exists():
        raise HomeError(
            f"{path} already holds a p2psync identity; it is never overwritten "
            "(use another --home for a second agent)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # an existing folder too: the home holds every record
    except OSError as exc:
        raise HomeError(f"cannot create the home at {path}: {exc.strerror or exc}") from exc
    seed = os.urandom(32)
    identity = Identity(seed)
    display = name or f"p2psync-{identity.short_id}"
    # The key file is written last: it marks a finished init, so an interrupted
    # init can simply be run again.
    store = Store(path / STORE_FILE, clock.now_ms(), create=True)
    try:
        owner = store.get_meta("self")
        if owner is not None and store.authors():
            raise HomeError(
                f"{path / STORE_FILE} belongs to another identity whose key is missing; "
                "restore its identity.key or use another --home"
            )
        store.set_meta("self", identity.public_key)
    finally:
        store.close()
    try:
        _write_config(path, {"name": display})
        _write_new(
            key_path,
            json.dumps({"type": _KEY_TYPE, "version": 1, "seed": seed.hex()}).encode() + b"\n",
        )
    except OSError as exc:
        raise HomeError(f"cannot create the home at {path}: {exc.strerror or exc}") from exc
    return Home(path, identity, display)


def load(path: Path) -> Home:
    """Load an existing home; a missing or uninitialised one is a clear error."""
    key_path = check_home(path)
    identity = read_identity(key_path)
    config = read_config(path)
    name = config.get("name")
    display = name if isinstance(name, str) else identity.short_id
    return Home(path, identity, display, clock_ahead_s(config, path) * 1000)


def check_home(path: Path) -> Path:
    """``path`` is an agent's home (its key file, returned); a relay's home or a
    folder with no home is a clear HomeError."""
    key_path = path / KEY_FILE
    if (path / RELAY_SETTINGS).exists() and not (path / STORE_FILE).exists():
        raise HomeError(
            f"{path} is a relay's home, not an agent's: the relay's own commands take it "
            f"(`p2psync relay status --home {shlex.quote(str(path))}`); an agent has a home "
            "of its own (`p2psync init --home PATH`)"
        )
    if not key_path.exists():
        raise HomeError(
            f"no p2psync home at {path}; run `p2psync init --home {shlex.quote(str(path))}` first"
        )
    return key_path


def clock_ahead_s(config: dict[str, object], path: Path) -> int:
    """The clock-ahead bound ``config`` sets (seconds), or the default; a value out
    of range is an error, not ignored: it guards what this site accepts."""
    value = config.get(CLOCK_AHEAD_KEY, hlc.DEFAULT_MAX_SKEW_MS // 1000)
    low, high = CLOCK_AHEAD_RANGE_S
    if type(value) is not int or not low <= value <= high:
        raise HomeError(
            f"{path / CONFIG_FILE}: {CLOCK_AHEAD_KEY} must be a whole number of seconds "
            f"from {low} to {high} (got {value!r}); set it with "
            "`p2psync settings --max-clock-ahead 10m`"
        )
    return value


def set_clock_ahead(path: Path, seconds: int) -> None:
    """Keep ``seconds`` as the home's clock-ahead bound (checked as :func:`load` does)."""
    config = read_config(path)
    config[CLOCK_AHEAD_KEY] = seconds
    clock_ahead_s(config, path)
    try:
        _write_config(path, config)
    except OSError as exc:
        raise HomeError(f"cannot write {path / CONFIG_FILE}: {exc.strerror or exc}") from exc


def read_identity(key_path: Path) -> Identity:
    """The identity in a key file (an agent's or a relay's); a clear HomeError when
    it is unreadable or readable by other users."""
    try:
        mode = key_path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise HomeError(
                f"{key_path} can be read by other users; "
                f"run `chmod 600 {shlex.quote(str(key_path))}`"
            )
        data = json.loads(key_path.read_text())
        seed = bytes.fromhex(data["seed"])
        if data.get("type") != _KEY_TYPE or len(seed) != 32:
            raise ValueError("not a p2psync key")
        return Identity(seed)
    except HomeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HomeError(f"{key_path} is not a readable p2psync identity ({exc})") from exc


def write_identity(key_path: Path) -> Identity:
    """Write a new identity to ``key_path`` (mode 0600, never overwriting one)."""
    seed = os.urandom(32)
    _write_new(
        key_path,
        json.dumps({"type": _KEY_TYPE, "version": 1, "seed": seed.hex()}).encode() + b"\n",
    )
    return Identity(seed)


def read_config(path: Path) -> dict[str, object]:
    """The home's settings; a missing file means the defaults. A file that cannot
    be read or parsed is an error (it holds the name peers see and the bound on
    what this site accepts: neither may silently fall back, nor be overwritten)."""
    file = path / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise HomeError(
            f"{file} cannot be read ({exc}); fix it, or remove it to use the defaults "
            "(the site's name then shows as its short ID)"
        ) from exc
    if not isinstance(data, dict):
        raise HomeError(f"{file} is not a JSON object; fix it, or remove it to use the defaults")
    return data


def _write_config(path: Path, config: dict[str, object]) -> None:
    tmp = path / (CONFIG_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path / CONFIG_FILE)
    _fsync_dir(path)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a new or renamed file in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def loose_permissions(path: Path) -> list[tuple[Path, int]]:
    """The home folder and the files, sockets and folders in it that others than
    its user may read or write (mode & 0o077), with their modes: what ``p2psync
    verify`` warns about."""
    found: list[tuple[Path, int]] = []
    try:
        entries = [path, *sorted(p for p in path.iterdir() if not p.is_symlink())]
    except OSError:
        return found
    for entry in entries:
        try:
            mode = stat.S_IMODE(entry.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077 and (entry.is_dir() or entry.is_file() or entry.is_socket()):
            found.append((entry, mode))
    return found
