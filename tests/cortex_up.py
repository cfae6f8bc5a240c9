"""`cortex up` as a real process on free ports, for the tests that drive it as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Up:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def cortex_up(
    workdir: Path, model_cache: Path, *, ready_timeout: float = 120, config: str | None = None
) -> Iterator[Up]:
    """Start `cortex up` (its neuron caching converted weights in `model_cache`, the gateway
    reading `config` as its cortex.toml when given), yield once /readyz answers 200; the process
    is killed on the way out if it has not exited."""
    port = free_port()
    log = workdir / "cortex-up.log"
    neuron_toml = workdir / "neuron.toml"
    neuron_toml.write_text(f"[neuron]\nname = 'local'\ncache_dir = '{model_cache}'\n")
    command = [sys.executable, "-m", "cortex.cli", "up", "--port", str(port)]
    command += ["--metrics-port", str(free_port()), "--neuron-config", str(neuron_toml)]
    if config is not None:
        (workdir / "cortex.toml").write_text(config)
        command += ["--config", str(workdir / "cortex.toml")]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cortex up did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)  # polling a starting process's port, not waiting for test state
        yield Up(url, process, log)
    finally:
        process.kill()
