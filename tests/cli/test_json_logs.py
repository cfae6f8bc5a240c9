"""`--log-format json` for the servers, run as a user runs them: every line on stdout and stderr
is a JSON object, the start-up banner one record holding its fields, a one-line error too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

JSON_CORTEX = (sys.executable, "-m", "cortex.cli", "--log-format", "json")
SERVERS = {  # each server's flags, given its API and metrics ports
    "gateway": lambda api, metrics: ["gateway", "--port", api, "--metrics-port", metrics],
    "up": lambda api, metrics: ["up", "--port", api, "--metrics-port", metrics],
    "neuron": lambda api, metrics: ["neuron", "--port", api],
}


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    return env | {"HOME": str(home)}  # the neuron's caches stay in the test


def records(text: str) -> list[dict[str, object]]:
    """Every line as a JSON object (a line that is not one fails, naming it)."""
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return parsed


@pytest.fixture
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The server, started with --log-format json and stopped with Ctrl-C once it answers: its
    API port, metrics port, and everything it wrote on stdout and stderr."""
    api, metrics = free_port(), free_port()
    argv = [*JSON_CORTEX, *SERVERS[request.param](api, metrics)]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path)
    )
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{api}/livez", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.returncode
            time.sleep(0.1)  # polling a starting process's port, with a deadline
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    yield api, metrics, out + err


@pytest.mark.parametrize("started", ["gateway", "up"], indirect=True)
def test_the_gateway_banner_is_one_json_record(started: tuple[str, str, str]) -> None:
    api, metrics, output = started
    lines = records(output)
    (ready,) = [r for r in lines if r["message"] == "cortex gateway ready"]
    assert ready["api"] == f"http://127.0.0.1:{api}/v1"
    assert ready["web_page"] == f"http://127.0.0.1:{api}/"
    assert ready["metrics"] == f"http://127.0.0.1:{metrics}/metrics"
    assert ready["config"] is None and ready["level"] == "info"
    models = ready["models"]
    assert {"id": "smollm2-135m-instruct", "kind": "chat"} in models  # type: ignore[operator]
    assert any("Started server process" in str(r["message"]) for r in lines)


@pytest.mark.parametrize("started", ["neuron"], indirect=True)
def test_the_neuron_writes_only_json(started: tuple[str, str, str]) -> None:
    _, _, output = started
    lines = records(output)
    assert any("Started server process" in str(r["message"]) for r in lines)


def test_a_one_line_error_is_a_json_record(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = subprocess.run(
            [*JSON_CORTEX, "gateway", "--port", port, "--metrics-port", free_port()],
            capture_output=True, text=True, timeout=120, env=clean_env(tmp_path),
        )  # fmt: skip
    assert done.returncode == 2 and not done.stdout
    (error,) = records(done.stderr)
    assert error["level"] == "error" and "already in use" in str(error["message"])
