"""Neurons die under the gateway: real `cortex neuron` and `cortex gateway` processes.

Two neurons serve a tiny random-weight Llama (file: source, so a start takes seconds). A neuron is
killed with SIGKILL (its whole process group, as a lost machine) in the middle of a stream, in each
dialect: the stream ends with that dialect's error event, never hangs, and the next request is
served by the other neuron. A restarted neuron is routed to again. With every neuron dead the
gateway answers a clear 503 with Retry-After and /readyz follows.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dialect_streams import DIALECTS, Dialect, parse
from polling import QUIET, eventually, status_is
from tiny_models import make_tiny_llama

from bench.processes import ServerProcess, answers, cortex_cli, free_port

MODEL = "tiny"
LONG = 4000  # tokens: a stream still running when its neuron is killed
READ_TIMEOUT = 30.0  # a stream that stops without ending fails the test instead of hanging it


@dataclass
class Fleet:
    gateway: str
    neurons: dict[str, ServerProcess]

    def status(self, name: str) -> dict | None:
        try:
            return httpx.get(f"{self.neurons[name].base_url}/status", timeout=2).json()
        except httpx.TransportError:
            return None

    def serving(self) -> str:
        """The neuron with a request in flight (exactly one). A neuron streaming flat out may not
        answer /status within its 2 s timeout on a loaded box: it is asked again."""
        busy: list[str] = []

        def one_busy() -> bool:
            busy[:] = [n for n in self.neurons if ((self.status(n) or {}).get("in_flight") or 0)]
            return len(busy) == 1

        eventually(one_busy, 10, "exactly one neuron with a request in flight")
        return busy[0]

    def kill(self, name: str) -> None:
        """SIGKILL the neuron's process group (server and device workers) and reap it."""
        process = self.neurons[name]._process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def ready_on(self) -> set[str]:
        fleet = httpx.get(f"{self.gateway}/fleet", timeout=5).json()
        return {
            n["name"]
            for n in fleet["neurons"]
            for r in n["replicas"]
            if r["id"] == MODEL and r["state"] == "ready" and n.get("healthy", True)
        }

    def revive(self) -> None:
        """Start every dead neuron again and wait until the gateway routes to all of them."""
        dead = [
            p for p in self.neurons.values() if p._process is None or p._process.poll() is not None
        ]
        with ThreadPoolExecutor(len(dead) or 1) as pool:
            list(pool.map(ServerProcess.start, dead))
        eventually(lambda: self.ready_on() == set(self.neurons), 30, "gateway sees every neuron")


def _model_ready(client: httpx.Client) -> bool:
    models = client.get("/status").json()["models"]
    return any(m["id"] == MODEL and m["state"] == "ready" for m in models)


def _neuron(name: str, directory: Path, tiny: Path) -> ServerProcess:
    port = free_port()
    config = directory / f"{name}.toml"
    config.write_text(
        f"[neuron]\nname = '{name}'\nport = {port}\ncache_dir = '{directory / name}'\n"
        f"allowed_paths = ['{tiny}']\npreload = ['{MODEL}']\n"
        f"[[models]]\nid = '{MODEL}'\nsource = 'file:{tiny}'\n"
    )
    return ServerProcess(
        name,
        [*cortex_cli(), "neuron", "--config", str(config)],
        _model_ready,
        base_url=f"http://127.0.0.1:{port}",
        env=QUIET,
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("faults")
    tiny = make_tiny_llama(directory / "tiny", context=LONG + 256)
    neurons = {name: _neuron(name, directory, tiny) for name in ("n1", "n2")}
    port = free_port()
    config = directory / "cortex.toml"
    entries = "".join(
        f"[[neurons]]\nname = '{n}'\nendpoint = '{p.base_url}'\n" for n, p in neurons.items()
    )
    config.write_text(
        f"[gateway]\nlisten = '127.0.0.1:{port}'\nmetrics_listen = ''\n"
        "poll_interval = 0.2\nunhealthy_after = 2\nload_timeout = 10\n"
        f"{entries}[[models]]\nid = '{MODEL}'\nsource = 'file:{tiny}'\n"
    )
    gateway = ServerProcess(
        "gateway",
        [*cortex_cli(), "gateway", "--config", str(config)],
        answers("/livez"),
        base_url=f"http://127.0.0.1:{port}",
    )
    try:
        with gateway:
            fleet = Fleet(gateway.base_url, neurons)
            fleet.revive()
            yield fleet
    finally:
        for process in neurons.values():
            process.stop()


def _complete(fleet: Fleet, dialect: Dialect, prompt: str = "Hello") -> httpx.Response:
    body = dialect.body(MODEL, 4, stream=False, prompt=prompt)
    return httpx.post(fleet.gateway + dialect.path, json=body, timeout=READ_TIMEOUT)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_neuron_killed_mid_stream_ends_the_stream_with_an_error_event(
    fleet: Fleet, dialect: Dialect
) -> None:
    fleet.revive()
    body = dialect.body(MODEL, LONG, stream=True)
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    with httpx.stream("POST", fleet.gateway + dialect.path, json=body, timeout=timeout) as answer:
        assert answer.status_code == 200
        text, killed = "", None
        for chunk in answer.iter_text():
            text += chunk
            if killed is None and len(parse(text)) >= 4:  # tokens are flowing
                killed = fleet.serving()
                fleet.kill(killed)
    assert killed is not None, f"the stream ended before a kill: {text[-300:]}"
    dialect.failed(parse(text))
    survivor = next(n for n in fleet.neurons if n != killed)
    served = (fleet.status(survivor) or {}).get("models", [{}])[0].get("last_used")
    after = _complete(fleet, dialect)
    assert after.status_code == 200, after.text
    assert (fleet.status(survivor) or {})["models"][0]["last_used"] != served


def test_a_restarted_neuron_is_routed_to_again(fleet: Fleet) -> None:
    dead = [n for n, p in fleet.neurons.items() if p._process and p._process.poll() is not None]
    if not dead:  # run alone: kill one first (after the mid-stream kills, one is dead already)
        fleet.kill("n1")
        dead = ["n1"]
    [name] = dead
    eventually(lambda: name not in fleet.ready_on(), 10, f"gateway notices {name} is gone")
    fleet.revive()  # it starts afresh, preloads, and the gateway's polls see it again
    used = lambda: (fleet.status(name) or {"models": [{}]})["models"][0].get("last_used")  # noqa: E731
    assert used() is None
    prompts = iter(range(1000))

    def served_by_it() -> bool:  # prompts differ: prefix affinity alone would pick one neuron
        assert _complete(fleet, DIALECTS[0], f"Question {next(prompts)}").status_code == 200
        return used() is not None

    eventually(served_by_it, 30, f"a request reaches the restarted {name}")


def test_with_every_neuron_dead_the_gateway_says_503_with_retry_after(fleet: Fleet) -> None:
    fleet.revive()
    for name in fleet.neurons:
        fleet.kill(name)
    for dialect in DIALECTS:
        answer = _complete(fleet, dialect)
        assert answer.status_code == 503, answer.text
        assert int(answer.headers.get("retry-after", 0)) >= 1, (answer.headers, answer.text)
        message = dialect.error_of(answer.json())["message"]
        assert "127.0.0.1" not in message  # names neurons, never their internal addresses
    eventually(lambda: status_is(f"{fleet.gateway}/readyz", 503), 10, "/readyz says not ready")
    assert httpx.get(f"{fleet.gateway}/livez", timeout=5).status_code == 200
