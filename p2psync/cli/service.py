"""`p2psync service unit`: a hardened systemd unit for `p2psync run` (or, with
``--relay``, for `p2psync relay serve`), printed for the operator to install.

The unit runs as the user who owns the home (or ``--user``), may write only the
home (``ProtectSystem=strict`` with ``ReadWritePaths``), sees no user's files
unless it needs some (``ProtectHome=``), has no capabilities (but
``CAP_NET_BIND_SERVICE`` for a port below 1024), no new privileges, a private
/tmp, and is restarted when it fails. The agent stops cleanly on SIGTERM.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import sys
from pathlib import Path

import click

from p2psync import home as home_mod
from p2psync.cli.context import State, pass_state
from p2psync.errors import HomeError, UsageError
from p2psync.net import agentsockets
from p2psync.net.address import parse_address


@click.group()
def service() -> None:
    """Run p2psync as a system service."""


@service.command(name="unit")
@click.option(
    "--relay", is_flag=True, help="The relay node's unit (`relay serve`; --home: its home)."
)
@click.option("--user", metavar="NAME", help="Run as this user (default: the home's owner).")
@click.option(
    "--executable",
    metavar="PATH",
    help="The p2psync program to run (default: the one running now).",
)
@click.option("--listen", multiple=True, metavar="HOST:PORT", help="Passed to the service.")
@click.option("--http", metavar="HOST:PORT", help="Passed to `run` (the HTTP API's address).")
@click.option("--no-http", is_flag=True, help="Passed to `run`.")
@click.option("--no-discovery", is_flag=True, help="Passed to `run`.")
@click.option(
    "--advertise",
    multiple=True,
    metavar="HOST:PORT",
    help="Passed to `relay serve` (where agents reach this node of a relay).",
)
@pass_state
def unit(
    state: State,
    relay: bool,
    user: str | None,
    executable: str | None,
    listen: tuple[str, ...],
    http: str | None,
    no_http: bool,
    no_discovery: bool,
    advertise: tuple[str, ...],
) -> None:
    """Print a hardened systemd unit for this home's agent (or relay node)."""
    if relay:
        from p2psync.relay import home as relay_home  # noqa: PLC0415 - only here

        home = relay_home.resolve(state.home_arg).resolve()
        if not (home / home_mod.RELAY_SETTINGS).exists():
            raise HomeError(
                f"no relay home at {home}; run `p2psync relay init --home {home}` first"
            )
        if http or no_http or no_discovery:
            raise UsageError("--http, --no-http and --no-discovery are for an agent's unit")
    else:
        home = state.home.resolve()
        home_mod.check_home(home)
        if advertise:
            raise UsageError("--advertise is for a relay node's unit (with --relay)")
    if no_http and http:
        raise UsageError("give --http or --no-http, not both")
    for address in (*listen, *advertise, *([http] if http else [])):
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not relay and len(str(home / "control.sock").encode()) > agentsockets.MAX_SOCKET_PATH:
        raise UsageError(
            f"{home} is too deep for a service: its agent's sockets would live outside "
            "the home (in a private folder under /tmp), which the unit's private /tmp "
            "hides from the commands; move the home to a shorter path"
        )
    program = _program(executable)
    owner = _user(home, user)
    account = pwd.getpwnam(owner)
    group = _group(account.pw_gid)
    # what the service reads: its home, its program and that program's interpreter
    # (a venv's python leads to the one it was made from), its user's home (~/.pgpass)
    needed = [home, Path(program).resolve(), Path(account.pw_dir).resolve()]
    needed += [Path(interpreter).resolve()] if (interpreter := _interpreter(program)) else []
    args = [program, "--home", str(home)]
    if relay:
        args += ["relay", "serve", *[f"--listen={a}" for a in listen]]
        args += [f"--advertise={a}" for a in advertise]
    else:
        args += ["run", *[f"--listen={a}" for a in listen]]
        args += [f"--http={http}"] if http else ["--no-http"] if no_http else []
        args += ["--no-discovery"] if no_discovery else []
    ports = [parse_address(a)[1] for a in listen] or ([7717] if not relay else [])
    low_port = any(0 < port < 1024 for port in ports)
    what = "relay node" if relay else "agent"
    lines = [
        "[Unit]",
        f"Description=p2psync {what} ({_escape(str(home))})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(_quote(a) for a in args)}",
        f"User={_escape(owner)}",
        f"Group={_escape(group)}",
        "UMask=0077",
        "Restart=on-failure",
        "RestartSec=5s",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        "# hardening: the home is all it may write",
        "ProtectSystem=strict",
        f"ReadWritePaths={_quote(str(home), exec_line=False)}",
        f"ProtectHome={_protect_home(needed)}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        # no W+X memory: checked with the agent (discovery, HTTP API, console) and
        # `p2psync demo` (sync, relay) under the same seccomp filter; PyNaCl's cffi
        # modules are compiled, and no JIT or ctypes callback is on their way
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        # netlink: the interfaces' addresses (discovery, `pair invite` hints)
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" if low_port else "CapabilityBoundingSet=",
        *(["AmbientCapabilities=CAP_NET_BIND_SERVICE"] if low_port else []),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    click.echo("\n".join(lines))
    for path in (home, Path(program).resolve()):
        if _under(path, _TEMPORARY):
            click.echo(
                f"warning: {path} is in a temporary folder, which the unit's private /tmp "
                "hides: the service would not start; move it (to /srv, say)",
                err=True,
            )
    name = "p2psync-relay.service" if relay else "p2psync.service"
    click.echo(
        f"save this as /etc/systemd/system/{name}, then: systemctl daemon-reload && "
        f"systemctl enable --now {name}",
        err=True,
    )


def _program(executable: str | None) -> str:
    """The absolute path of the p2psync program the unit runs."""
    running = Path(sys.argv[0]).absolute() if Path(sys.argv[0]).name == "p2psync" else None
    found = executable or (str(running) if running else None) or shutil.which("p2psync")
    if found is None:
        raise UsageError(
            "cannot tell where the p2psync program is; give it with --executable PATH"
        )
    path = Path(found)
    if not path.is_absolute():
        raise UsageError(f"--executable: {found!r} is not an absolute path")
    if not os.access(path, os.X_OK):
        raise UsageError(f"--executable: {found} is not an executable file")
    return str(path)


def _interpreter(program: str) -> str | None:
    """The interpreter on the ``#!`` line of ``program`` (a console script's
    python), if it names one by its path."""
    try:
        with open(program, "rb") as file:
            first = file.readline(4096)
    except OSError:
        return None
    words = first[2:].split() if first.startswith(b"#!") else []
    return os.fsdecode(words[0]) if words and words[0].startswith(b"/") else None


#: The folders ProtectHome= hides (yes) or makes read-only (read-only).
_USERS_FILES = (Path("/home"), Path("/root"), Path("/run/user"))


def _protect_home(needed: list[Path]) -> str:
    """``yes`` (every user's files hidden) unless the service needs a path in them;
    then ``read-only``: writing there is refused already (ProtectSystem=strict), and
    the home, a ReadWritePaths= nested in it, stays writable. (An inaccessible
    folder cannot have a writable one inside it.)"""
    # (/home may be a link, to /var/home on ostree systems: systemd hides both)
    tops = (*_USERS_FILES, *(top.resolve() for top in _USERS_FILES))
    return "read-only" if any(_under(path, tops) for path in needed) else "yes"


#: The folders PrivateTmp= replaces with the service's own empty ones.
_TEMPORARY = (Path("/tmp"), Path("/var/tmp"))


def _under(path: Path, tops: tuple[Path, ...]) -> bool:
    return any(path == top or top in path.parents for top in tops)


def _user(home: Path, user: str | None) -> str:
    """``user`` (it must exist), else the owner of the home; root only when asked."""
    uid = home.stat().st_uid
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        if user == "root":
            return user  # root reads any home
        raise UsageError(
            f"{home} belongs to uid {uid}, which is no user on this machine: give it to "
            "the user the service should run as (chown -R NAME: HOME) and pass --user "
            "NAME, or pass --user root"
        ) from None
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user: there is no user {user!r} on this machine") from None
        if user not in (owner, "root"):
            raise UsageError(
                f"--user {user}: {home} belongs to {owner} and only its owner may read it "
                f"(the agent's key is there): give it to {user} first "
                f"(chown -R {user}: {home})"
            )
        return user
    if owner == "root":
        raise UsageError(
            f"{home} belongs to root: a service should run as a user of its own (create "
            "one, give it the home with chown -R, and pass --user NAME), or pass --user root"
        )
    return owner


def _group(gid: int) -> str:
    """The group's name, or its number (Group= takes either) when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _escape(text: str) -> str:
    """A value systemd reads literally: specifiers (%) doubled; no line breaks."""
    if "\n" in text or "\r" in text:
        raise UsageError(f"{text!r} holds a line break, which a unit file cannot")
    return text.replace("%", "%%")


def _quote(text: str, exec_line: bool = True) -> str:
    """One word of ExecStart (or a path of ReadWritePaths), double-quoted for
    systemd: backslashes and quotes escaped, % doubled, and $ doubled where
    systemd expands it (Exec lines only)."""
    text = _escape(text).replace("\\", "\\\\").replace('"', '\\"')
    if exec_line:
        text = text.replace("$", "$$")
    return f'"{text}"'


COMMANDS = (service,)
