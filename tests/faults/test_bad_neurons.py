"""Neurons that break after their headers: one hangs (the gateway's read timeout ends the wait),
one answers garbage (a clear error in the dialect's envelope). The gateway stays healthy.

The faulty neurons are small fake servers in their own processes (faulty_neuron.py) behind a real
`cortex gateway` process whose request_timeout is two seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dialect_streams import DIALECTS, Dialect, parse

from bench.processes import PYTHON, ServerProcess, answers, cortex_cli, free_port

READ_TIMEOUT = 2.0  # the gateway's request_timeout: its longest wait between two reads
CLIENT_TIMEOUT = httpx.Timeout(10.0, read=15.0)  # longer: the gateway must answer first


def _faulty(mode: str) -> ServerProcess:
    port = free_port()
    script = Path(__file__).with_name("faulty_neuron.py")
    argv = [PYTHON, str(script), "--mode", mode, "--port", str(port)]
    return ServerProcess(mode, argv, answers("/health"), base_url=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    neurons = {mode: _faulty(mode) for mode in ("hang", "garbage")}
    port = free_port()
    config = tmp_path_factory.mktemp("bad-neurons") / "cortex.toml"
    entries = "".join(
        f"[[neurons]]\nname = '{n}'\nendpoint = '{p.base_url}'\n" for n, p in neurons.items()
    )
    config.write_text(
        f"[gateway]\nlisten = '127.0.0.1:{port}'\nmetrics_listen = ''\n"
        f"poll_interval = 0.2\nrequest_timeout = {READ_TIMEOUT}\n{entries}"
    )
    ready = answers("/health")  # both neurons polled healthy
    gateway = ServerProcess(
        "gateway",
        [*cortex_cli(), "gateway", "--config", str(config)],
        lambda client: ready(client) and client.get("/health").json()["status"] == "ok",
        base_url=f"http://127.0.0.1:{port}",
    )
    with neurons["hang"], neurons["garbage"], gateway:
        yield gateway.base_url


def _healthy(gateway: str) -> None:
    assert httpx.get(f"{gateway}/health", timeout=5).json()["status"] == "ok"
    assert httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_neuron_hanging_after_its_headers_times_out(gateway: str, dialect: Dialect) -> None:
    started = time.monotonic()
    answer = httpx.post(
        gateway + dialect.path, json=dialect.body("hang", 8, stream=False), timeout=CLIENT_TIMEOUT
    )
    assert answer.status_code in (502, 503, 504), answer.text
    assert "timeout" in dialect.error_of(answer.json())["message"].lower()  # ReadTimeout
    with httpx.stream(
        "POST", gateway + dialect.path, json=dialect.body("hang", 8, stream=True),
        timeout=CLIENT_TIMEOUT,
    ) as stream:  # fmt: skip
        text = "".join(stream.iter_text())
    dialect.failed(parse(text))
    assert time.monotonic() - started < 4 * READ_TIMEOUT + 5
    _healthy(gateway)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_neuron_answering_garbage_is_a_clear_error(gateway: str, dialect: Dialect) -> None:
    answer = httpx.post(
        gateway + dialect.path,
        json=dialect.body("garbage", 8, stream=False),
        timeout=CLIENT_TIMEOUT,
    )
    assert answer.status_code == 503, answer.text
    dialect.error_of(answer.json())
    with httpx.stream(
        "POST", gateway + dialect.path, json=dialect.body("garbage", 8, stream=True),
        timeout=CLIENT_TIMEOUT,
    ) as stream:  # fmt: skip
        text = "".join(stream.iter_text())
    dialect.failed(parse(text))
    _healthy(gateway)
