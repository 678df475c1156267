"""Starting and stopping an agent as a child process (the demo, benchmarks, tests).

The child is ``python -m p2psync --home HOME run ...``, optionally behind a
prefix such as ``ip netns exec NS``. It is ended by its PID: SIGTERM, then
SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from p2psync.errors import P2PSyncError


class AgentProcess:
    """One agent child process; ``address`` is where it listens once started."""

    def __init__(
        self,
        home: Path,
        *,
        listen: str = "127.0.0.1:0",
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        log: Path | None = None,
        command: Sequence[str] = ("run",),
    ) -> None:
        self.home = home
        self.command = list(command)  # ("relay", "serve") runs a relay node
        self.address = listen
        self.args = list(args)
        self.http_url: str | None = None  # the HTTP API's, when started with --http
        self.prefix = list(prefix)
        self.log = log
        self.process: subprocess.Popen[str] | None = None

    def start(self, *extra: str) -> None:
        """Start and wait for ``listening on``; a port 0 becomes the port chosen,
        kept across restarts."""
        args = [*self.args, *extra]
        http = any(a == "--http" or a.startswith("--http=") for a in args)
        if self.command == ["run"] and not http and "--no-http" not in args:
            args.append("--no-http")  # many agents on one machine: HTTP where asked for
        stderr: int | IO[str] = subprocess.DEVNULL
        handle = self.log.open("a") if self.log is not None else None
        if handle is not None:
            stderr = handle
        try:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "p2psync",
                    "--home",
                    str(self.home),
                    *self.command,
                    "--listen",
                    self.address,
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        finally:
            if handle is not None:
                handle.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            log = f": {self.log.read_text()[-500:]}" if self.log is not None else ""
            raise P2PSyncError(f"the agent at {self.home} did not start{log}")
        self.address = line.split()[-1]
        if http and self.command == ["run"]:
            while line and not line.startswith("HTTP API"):
                line = self.process.stdout.readline()
            if not line:
                self.stop()
                raise P2PSyncError(f"the agent at {self.home} did not start its HTTP API")
            self.http_url = line.split()[-1].rstrip("/")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise P2PSyncError("the agent is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._forget()
        return code

    def kill9(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self._forget()

    def _forget(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
