"""Servers a benchmark runs as child processes: started, awaited until ready, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cortex_cli() -> list[str]:
    """The `cortex` console script of this interpreter (no PATH lookup)."""
    return [PYTHON, "-m", "cortex.cli"]


class ServerProcess:
    """One server in its own process (and process group), its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[httpx.Client], bool],
        *,
        base_url: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = ready
        self.base_url = base_url
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # spawn to ready, once started

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """CPU time the running server has used so far (user + system, from /proc)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> ServerProcess:
        """Spawn and poll `ready` until it answers True, the process dies, or the deadline passes."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self._process.pid})")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,  # its own group: stop() reaches workers it forks
            )
        spawned = time.monotonic()
        deadline = spawned + self.startup_timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                if self._process.poll() is not None:
                    raise ServerFailed(
                        f"{self.name} exited with {self._process.returncode}" + self.tail()
                    )
                try:
                    if self.ready(client):
                        self.startup_s = time.monotonic() - spawned
                        return self
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerFailed(
                        f"{self.name} not ready after {self.startup_timeout:.0f}s" + self.tail()
                    )
                time.sleep(0.2)  # polling interval of a readiness check with a deadline

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if it lingers past 15 s."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n  " + "\n  ".join(text) if text else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def answers(path: str, status: int = 200) -> Callable[[httpx.Client], bool]:
    """Ready when GET path answers `status`."""
    return lambda client: client.get(path).status_code == status
