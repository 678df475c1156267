"""Throwaway PostgreSQL clusters for tests: initdb, start, stop, kill -9, standbys, failover.

Every cluster lives in one directory ``ROOT/NAME`` (data directory ``data/``, Unix
socket directory ``sock/``, server log ``postgres.log``) and listens on its Unix socket
only (``listen_addresses = ''``); the port only names the socket. Server commands
(initdb, postgres, pg_ctl, pg_basebackup) run as the ``postgres`` user through
``runuser`` when we are root (initdb refuses root), directly otherwise; the client
(``psql``) runs as us and connects as the database user ``postgres`` (trust).

The postmaster is started as a child of a small *reaper* process (a Linux child
subreaper) rather than daemonized by ``pg_ctl start``: the reaper waits for the
postmaster and for every backend that outlives it (after a ``kill -9``), so stopping
or killing a cluster leaves no zombie behind even where PID 1 does not reap orphans,
and "the reaper has exited" means "every process of this cluster is gone".

Typical use::

    root = temp_root()
    primary = PgCluster.create(root, "primary", sync_standby="s1")
    primary.start()
    standby = PgCluster.standby_of(primary, root, "s1", application_name="s1")
    ...
    standby.destroy(); primary.destroy(); shutil.rmtree(root)

A primary made with ``sync_standby`` blocks every commit until that standby is
connected: start the standby before writing (``CREATE DATABASE`` included).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: The server runs as this operating-system user when we are root.
SERVER_USER = "postgres"
#: The database superuser every conninfo names.
DB_USER = "postgres"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 30.0

#: Longest Unix socket path (sun_path is 108 bytes with the trailing NUL).
_MAX_SOCKET_PATH = 107

#: Runs ``argv[1:]`` as its child, becomes the subreaper of everything under it, and
#: exits (with the child's status) once it has reaped every descendant.
_REAPER = r"""
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
alive = [True]
def forward(signum, frame):
    if alive[0]:
        try:
            os.kill(child, signum)
        except OSError:
            pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        alive[0] = False
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""

_used_ports: set[int] = set()


class PgClusterError(RuntimeError):
    """A server command failed, or the server did not start / stop in time."""


def find_bindir() -> Path | None:
    """The PostgreSQL server bin directory: ``pg_config --bindir`` when it holds
    ``initdb``, else the highest ``/usr/lib/postgresql/*/bin`` that does, else None."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and (Path(out) / "initdb").is_file():
                return Path(out)
    found: list[tuple[tuple[int, ...], Path]] = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bindir.parent.name
        if (bindir / "initdb").is_file() and re.fullmatch(r"\d+(\.\d+)*", version):
            found.append((tuple(int(part) for part in version.split(".")), bindir))
    return max(found)[1] if found else None


def unavailable_reason() -> str | None:
    """Why clusters cannot be made on this machine, or None when they can."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries not found (no initdb from pg_config --bindir or "
            "in /usr/lib/postgresql/*/bin; scripts/test installs the postgresql package "
            "when run as root)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run the server"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


def temp_root(prefix: str = "pgc-") -> Path:
    """A fresh temporary directory for clusters, traversable by the server user
    (mode 0711). The caller removes it (``shutil.rmtree``) after destroying the
    clusters in it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    return root


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_ids() -> tuple[int, int]:
    if not _as_root():
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def _give_to_server(path: Path, mode: int) -> None:
    if _as_root():
        uid, gid = _server_ids()
        os.chown(path, uid, gid)
    path.chmod(mode)


def _check_traversable(directory: Path) -> None:
    """Raise when the server user cannot reach ``directory`` (every ancestor needs x)."""
    if not _as_root():
        return
    uid, gid = _server_ids()
    groups = set(os.getgrouplist(SERVER_USER, gid))
    for path in [directory, *directory.parents]:
        st = path.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            group = grp.getgrgid(st.st_gid).gr_name if st.st_gid in groups else "other"
            raise PgClusterError(
                f"{path} is not traversable by the {SERVER_USER} user ({group} has no x "
                "bit): put clusters under pgcluster.temp_root() or chmod o+x it"
            )


def _env() -> dict[str, str]:
    """Our environment without libpq's PG* variables (they would redirect clients)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("TZ", "UTC")  # initdb skips its time-zone search
    env["LC_ALL"] = "C"
    return env


def _server_cmd(cmd: Sequence[str]) -> list[str]:
    if _as_root():
        return ["runuser", "-u", SERVER_USER, "--", *cmd]
    return list(cmd)


def _run_server(cmd: Sequence[str], cwd: Path, timeout: float = 120) -> str:
    """Run a server command as the server user; raise with its output on failure."""
    result = subprocess.run(
        _server_cmd(cmd),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise PgClusterError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
        )
    return result.stdout


def _pick_port() -> int:
    """A port no other cluster of ours uses (and free on loopback TCP, to be tidy;
    the server itself listens on its Unix socket only)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _used_ports:
            return port


def _conf_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _conn_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _remove_unattached_shm(shmid: int) -> None:
    """Remove the SysV interlock segment of a killed postmaster once nobody has it
    attached (a clean shutdown removes it; SIGKILL leaves it behind)."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) > 6 and int(fields[1]) == shmid and int(fields[6]) == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(0), None)  # IPC_RMID
            return


class PgCluster:
    """One PostgreSQL cluster in ``root/name``; see the module docstring."""

    def __init__(self, bindir: Path, directory: Path, port: int) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "postgres.log"
        self._socket_dir = directory / "sock"
        self._port = port
        self._reaper: subprocess.Popen[bytes] | None = None
        _used_ports.add(port)

    # -- making clusters ------------------------------------------------------------

    @classmethod
    def _prepare(cls, root: Path, name: str, port: int | None) -> PgCluster:
        bindir = find_bindir()
        if bindir is None:
            raise PgClusterError(unavailable_reason() or "no PostgreSQL binaries")
        root.mkdir(parents=True, exist_ok=True)
        directory = root.resolve() / name
        _check_traversable(directory.parent)
        cluster = cls(bindir, directory, port if port is not None else _pick_port())
        sock_path = cluster.socket_dir / f".s.PGSQL.{cluster.port}"
        if len(str(sock_path)) > _MAX_SOCKET_PATH:
            raise PgClusterError(
                f"socket path {sock_path} is longer than {_MAX_SOCKET_PATH} bytes: "
                "use a shorter root (pgcluster.temp_root())"
            )
        if "," in str(directory):
            raise PgClusterError(f"{directory}: a comma would break multi-host conninfos")
        directory.mkdir()
        _give_to_server(directory, 0o700)
        cluster.socket_dir.mkdir()
        _give_to_server(cluster.socket_dir, 0o700)
        return cluster

    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        *,
        port: int | None = None,
        sync_standby: str | None = None,
    ) -> PgCluster:
        """initdb a new (stopped) cluster in ``root/name``. With ``sync_standby``, the
        standby whose application_name is that one is synchronous (every commit waits
        for it)."""
        cluster = cls._prepare(root, name, port)
        _run_server(
            [
                str(cluster.bindir / "initdb"),
                "-D", str(cluster.data_dir),
                "-U", DB_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=cluster.directory,
        )
        (cluster.data_dir / "pg_hba.conf").write_text(
            "# written by tests/pgcluster.py: Unix socket only, trust\n"
            "local all all trust\n"
            "local replication all trust\n"
        )
        with (cluster.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude = 'pgcluster.conf'\n")
        cluster._write_conf(sync_standby=sync_standby)
        return cluster

    @classmethod
    def standby_of(
        cls,
        primary: PgCluster,
        root: Path,
        name: str,
        *,
        application_name: str,
        port: int | None = None,
    ) -> PgCluster:
        """A streaming standby of the running ``primary`` (pg_basebackup), started; when
        the primary names ``application_name`` as its synchronous standby, this returns
        once the primary reports it ``sync``."""
        cluster = cls._prepare(root, name, port)
        _run_server(
            [
                str(cluster.bindir / "pg_basebackup"),
                "-D", str(cluster.data_dir),
                "-d", primary.conninfo(dbname="postgres"),
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ],
            cwd=cluster.directory,
        )
        primary_conninfo = (
            f"{primary.conninfo(dbname='postgres')} "
            f"application_name={_conn_value(application_name)}"
        )
        cluster._write_conf(sync_standby=None, primary_conninfo=primary_conninfo)
        signal_file = cluster.data_dir / "standby.signal"
        signal_file.touch()
        _give_to_server(signal_file, 0o600)
        cluster.start()
        if primary.sync_standby_names() == application_name:
            primary.wait_sync(application_name)
        return cluster

    def _write_conf(self, *, sync_standby: str | None, primary_conninfo: str | None = None) -> None:
        settings = {
            "listen_addresses": _conf_str(""),
            "port": str(self.port),
            "unix_socket_directories": _conf_str(str(self.socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": "40",
            "shared_buffers": "16MB",
            # files in the data directory: removed with it even after a kill -9
            "dynamic_shared_memory_type": "mmap",
            "fsync": "on",
            "full_page_writes": "on",
            "synchronous_commit": "on",
            "wal_level": "replica",
            "max_wal_senders": "8",
            "max_replication_slots": "8",
            "wal_keep_size": "64MB",
            "hot_standby": "on",
            "wal_retrieve_retry_interval": _conf_str("200ms"),
            "synchronous_standby_names": _conf_str(sync_standby or ""),
            "logging_collector": "off",
        }
        if primary_conninfo is not None:
            settings["primary_conninfo"] = _conf_str(primary_conninfo)
        path = self.data_dir / "pgcluster.conf"
        path.write_text(
            "# written by tests/pgcluster.py\n"
            + "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        _give_to_server(path, 0o600)

    # -- properties -----------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        return self._socket_dir

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._reaper is not None and self._reaper.poll() is None

    def _pidfile(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        lines = self._pidfile()
        if not self.running or not lines:
            return None
        pid = int(lines[0])
        return pid if _pid_alive(pid) else None

    # -- running --------------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until it accepts connections (as a primary, or as
        a hot standby); raise with the log tail when it does not."""
        if self.running:
            raise PgClusterError(f"{self.directory} is already running")
        started = time.time()
        with self.log_path.open("ab") as log:
            self._reaper = subprocess.Popen(
                [
                    sys.executable, "-I", "-S", "-c", _REAPER,
                    *_server_cmd([str(self.bindir / "postgres"), "-D", str(self.data_dir)]),
                ],
                cwd=self.directory,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            lines = self._pidfile()
            if (
                len(lines) >= 8
                and lines[7].strip() in ("ready", "standby")
                and int(lines[2]) >= int(started) - 1
                and _pid_alive(int(lines[0]))
            ):
                return
            if self._reaper.poll() is not None:
                self._reaper = None
                raise PgClusterError(
                    f"postgres in {self.directory} exited while starting:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill9()
                raise PgClusterError(
                    f"postgres in {self.directory} did not start in {timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)

    def _wait_gone(self, timeout: float) -> bool:
        """Wait until the reaper (so every server process) has exited."""
        assert self._reaper is not None
        try:
            self._reaper.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reaper = None
        return True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT to the postmaster); kill -9 when it takes too long."""
        if not self.running:
            self._reaper = None
            return
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if not self._wait_gone(timeout):
            self.kill9()

    def kill9(self, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster (a crash) and wait until every backend has exited
        (they notice the postmaster's death on their own); the cluster can then be
        started again (crash recovery)."""
        if self._reaper is None:
            return
        lines = self._pidfile()
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(timeout):
            # backends that would not go: ours, killed by PID (the reaper's children)
            reaper = self._reaper
            for child in _children_of(reaper.pid):
                for grandchild in _children_of(child):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(grandchild, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            if not self._wait_gone(timeout):
                raise PgClusterError(f"processes of {self.directory} do not exit")
        if len(lines) >= 7 and len(fields := lines[6].split()) == 2:
            _remove_unattached_shm(int(fields[1]))

    def promote(self, timeout: float = START_TIMEOUT_S) -> None:
        """Promote this standby and wait until it accepts writes."""
        _run_server(
            [str(self.bindir / "pg_ctl"), "promote", "-w", "-t", str(int(timeout)),
             "-D", str(self.data_dir)],
            cwd=self.directory,
        )

    def destroy(self) -> None:
        """Stop the server when it runs and remove the cluster's directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            _used_ports.discard(self.port)

    # -- clients --------------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq key=value conninfo for ``dbname`` over this cluster's socket."""
        return (
            f"host={_conn_value(str(self.socket_dir))} port={self.port} "
            f"user={DB_USER} dbname={_conn_value(dbname)}"
        )

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run ``sql`` with psql (unaligned, tuples only); its output, stripped."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
             "-d", self.conninfo(dbname), "-c", sql],
            cwd=self.directory,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise PgClusterError(f"psql {sql!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """Create database ``name``; its conninfo."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.conninfo(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sync_standby_names(self) -> str:
        return self.psql("SHOW synchronous_standby_names")

    def wait_sync(self, application_name: str, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Wait until this primary's pg_stat_replication shows ``application_name``
        with sync_state 'sync'."""
        deadline = time.monotonic() + timeout
        query = (
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = "
            + _conf_str(application_name)
        )
        while (state := self.psql(query)) != "sync":
            if time.monotonic() > deadline:
                raise PgClusterError(
                    f"standby {application_name!r} not sync after {timeout:.0f} s "
                    f"(state {state!r}):\n{self.log_tail()}"
                )
            time.sleep(0.02)


def multi_host_conninfo(clusters: Sequence[PgCluster], dbname: str = "postgres") -> str:
    """A libpq conninfo naming every cluster; libpq connects to the first that takes
    writes (target_session_attrs=read-write), giving up on each after 2 s."""
    hosts = ",".join(str(c.socket_dir) for c in clusters)
    ports = ",".join(str(c.port) for c in clusters)
    return (
        f"host={_conn_value(hosts)} port={ports} target_session_attrs=read-write "
        f"connect_timeout=2 user={DB_USER} dbname={_conn_value(dbname)}"
    )
