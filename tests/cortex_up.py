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


def unload_all(url: str, timeout: float = 120) -> None:
    """Unload every model the `cortex up` at `url` holds, retrying one still busy with a stream a
    previous test left, until its fleet shows none: the state a fresh `cortex up` starts in."""
    deadline = time.monotonic() + timeout
    while True:
        fleet = httpx.get(f"{url}/fleet", timeout=10).json()
        held = [(n["name"], r) for n in fleet["neurons"] for r in n["replicas"]]
        if not held:
            return
        for neuron, replica in held:
            if replica["state"] == "ready":
                body = {"neuron": neuron}
                httpx.post(f"{url}/admin/models/{replica['id']}/unload", json=body, timeout=60)
        failed = any(replica["state"] == "failed" for _, replica in held)
        if failed or time.monotonic() > deadline:
            raise RuntimeError(f"cortex up cannot start afresh, it holds {held}")
        time.sleep(0.1)  # polling the fleet's state, with a deadline
