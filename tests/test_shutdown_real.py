"""Graceful shutdown with real processes (docs/architecture.md): two `cortex neuron`s serving a
tiny random-weight model behind a `cortex gateway`. On SIGTERM a neuron refuses new work with 503
`shutting_down` + Retry-After while its running stream finishes, and the gateway sends its
requests to the other replica; on SIGTERM the gateway fails /readyz, refuses new calls, finishes
its running stream, then exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent / "neuron"))
from tiny_models import make_tiny_llama

MODEL = "tiny"
# Greedy, and long enough that the stream outlasts the test's requests after the signal.
STREAM = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True}


def _lists_ready(status: httpx.Response, model: str) -> bool:
    return any(m["id"] == model and m["state"] == "ready" for m in status.json()["models"])


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_until(self, ready: str, timeout: float = 180, model: str | None = None) -> None:
        """Until `ready` answers 200 (and, with `model`, lists it ready: preloads run beside
        serving)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = httpx.get(f"{self.url}{ready}", timeout=2)
                if answer.status_code == 200 and (model is None or _lists_ready(answer, model)):
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready:\n{self.tail()}")
            time.sleep(0.1)

    def exited(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit:\n{self.tail()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _spawn(name: str, args: list[str], port: int, directory: Path) -> Proc:
    log = directory / f"{name}.log"
    command = [sys.executable, "-m", "cortex.cli", *args]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    return Proc(name, f"http://127.0.0.1:{port}", process, log)


def _neuron(name: str, tiny: Path, directory: Path) -> Proc:
    port = _port()
    config = directory / f"{name}.toml"
    config.write_text(
        f"[neuron]\nname = '{name}'\nport = {port}\npreload = ['{MODEL}']\nshutdown_grace = 60\n"
        f"[[models]]\nid = '{MODEL}'\nsource = 'file:{tiny}'\n"
    )
    return _spawn(name, ["neuron", "--config", str(config)], port, directory)


def _gateway(neurons: list[Proc], tiny: Path, directory: Path) -> Proc:
    port, metrics = _port(), _port()
    config = directory / "cortex.toml"
    entries = "".join(f"[[neurons]]\nname = '{n.name}'\nendpoint = '{n.url}'\n" for n in neurons)
    config.write_text(
        "[gateway]\npoll_interval = 0.5\nshutdown_grace = 60\n"
        f"[[models]]\nid = '{MODEL}'\nsource = 'file:{tiny}'\n{entries}"
    )
    args = ["gateway", "--config", str(config), "--port", str(port)]
    return _spawn("gateway", [*args, "--metrics-port", str(metrics)], port, directory)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc]]:
    directory = tmp_path_factory.mktemp("shutdown")
    tiny = make_tiny_llama(directory / "tiny")
    n1, n2 = _neuron("n1", tiny, directory), _neuron("n2", tiny, directory)
    gateway: Proc | None = None
    try:
        for neuron in (n1, n2):
            neuron.wait_until("/status", model=MODEL)
        gateway = _gateway([n1, n2], tiny, directory)
        gateway.wait_until("/readyz")
        yield n1, n2, gateway
    finally:
        for proc in (gateway, n1, n2):
            if proc is not None:
                proc.stop()


def _events(response: httpx.Response) -> Iterator[dict[str, object] | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def _finish(events: Iterator[dict[str, object] | str]) -> tuple[int, str | None]:
    """Read a stream to its end: (text chunks, finish_reason of the last choice)."""
    chunks, reason = 0, None
    for event in events:
        if event == "[DONE]":
            return chunks, reason
        assert isinstance(event, dict) and "error" not in event, event
        for choice in event["choices"]:  # type: ignore[attr-defined]
            chunks += 1
            reason = choice.get("finish_reason") or reason
    raise AssertionError("the stream ended without [DONE]")


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"
    assert int(response.headers["retry-after"]) >= 1


def test_sigterm_drains_a_neuron_and_the_gateway_fails_over(
    fleet: tuple[Proc, Proc, Proc],
) -> None:
    n1, _, gateway = fleet
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{n1.url}/v1/completions", json=STREAM) as running:
            assert running.status_code == 200
            events = _events(running)
            next(events)  # generating
            n1.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while http.get(f"{n1.url}/health").status_code == 200:
                assert time.monotonic() < deadline, "the neuron did not start draining"
                time.sleep(0.02)
            _refused(http.post(f"{n1.url}/v1/completions", json={**STREAM, "stream": False}))
            assert http.get(f"{n1.url}/status").json()["healthy"] is False
            assert http.get(f"{n1.url}/livez").status_code == 200  # alive, not ready
            # Through the gateway, every request is answered (by n2, or retried onto it).
            for i in range(4):
                body = {"model": MODEL, "prompt": f"question {i}", "max_tokens": 4}
                answer = http.post(f"{gateway.url}/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
            chunks, reason = _finish(events)
        assert reason == "length" and chunks >= 200  # finished, not cut
    assert n1.exited() in (0, -signal.SIGTERM)


def test_sigterm_drains_the_gateway(fleet: tuple[Proc, Proc, Proc]) -> None:
    _, n2, gateway = fleet
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{gateway.url}/v1/completions", json=STREAM) as running:
            assert running.status_code == 200
            events = _events(running)
            next(events)
            gateway.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := http.get(f"{gateway.url}/readyz")).status_code == 200:
                assert time.monotonic() < deadline, "the gateway did not start draining"
                time.sleep(0.02)
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert ready.json()["status"] == "shutting_down"
            body = {"model": MODEL, "prompt": "late", "max_tokens": 4}
            _refused(http.post(f"{gateway.url}/v1/completions", json=body))
            chunks, reason = _finish(events)
        assert reason == "length" and chunks >= 200
    assert gateway.exited() in (0, -signal.SIGTERM)
    assert httpx.get(f"{n2.url}/health").status_code == 200  # the neuron was not disturbed
