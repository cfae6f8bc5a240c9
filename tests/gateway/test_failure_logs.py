"""Each failed call is logged once (docs/architecture.md, "Request flow"): one WARNING line
naming its code, neuron, cause and request id; a bug's traceback once, never again by the
server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec

from cortex.gateway.dialects.openai import ChatDialect, PassThrough

MODEL = "chat-a"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.WARNING]

    def tracebacks(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.exc_info]


@pytest.fixture
def logs() -> Iterator[Records]:
    """cortex's loggers."""
    records = Records()
    cortex = logging.getLogger("cortex")
    level = cortex.level
    cortex.addHandler(records)
    cortex.setLevel(logging.INFO)
    try:
        yield records
    finally:
        cortex.removeHandler(records)
        cortex.setLevel(level)


@contextmanager
def server_logs(records: Records) -> Iterator[None]:
    """uvicorn's error logger too: it does not propagate, and each server's start configures it
    afresh, so this is entered once the servers run."""
    server = logging.getLogger("uvicorn.error")
    server.addHandler(records)
    try:
        yield
    finally:
        server.removeHandler(records)


def _failures(logs: Records) -> list[str]:
    return [r.getMessage() for r in logs.warnings() if "failed:" in r.getMessage()]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_neuron_failure_is_one_warning_naming_code_neuron_cause_and_id(
    logs: Records, stream: bool
) -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB}, reply="one two three four")
    if stream:
        n1.faults.die_after = 2  # the stream is cut mid-way
    else:
        n1.faults.fail_requests, n1.faults.fail_mode = 1, "500"  # the neuron crashes
    async with cluster(n1, catalogue=[spec(MODEL)]) as c:
        body, rid = chat_body(MODEL, stream=stream), {"x-request-id": "req-42"}
        response = await c.http.post("/v1/chat/completions", json=body, headers=rid)
        assert response.status_code == (200 if stream else 500)
        await eventually(lambda: len(_failures(logs)) == 1)
        (line,) = _failures(logs)
        said = "503 neuron_unavailable" if stream else "500 upstream_error"  # the fake's 500
        assert f"call to {MODEL} on n1 failed: {said}" in line
        assert ("mid-stream" if stream else "Internal Server Error") in line
        assert "request req-42" in line


async def test_a_bug_before_the_proxy_has_one_traceback(
    logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, data: dict[str, Any]) -> object:
        raise RuntimeError("a bug in a dialect")

    monkeypatch.setattr(ChatDialect, "parse", broken)
    neuron = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(neuron, catalogue=[spec(MODEL)]) as c:
        with server_logs(logs):
            response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
            assert response.status_code == 500
            assert (await c.http.get("/health")).status_code == 200  # served after it
    assert len(logs.tracebacks()) == 1, [r.getMessage() for r in logs.tracebacks()]


async def test_a_bug_mid_stream_ends_it_with_an_error_logged_once(
    logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = PassThrough.feed

    def breaks_on_the_second(self: PassThrough, event: bytes, payload: Any) -> list[bytes]:
        if self._tokens:
            raise KeyError("a bug in the relay")
        return feed(self, event, payload)

    monkeypatch.setattr(PassThrough, "feed", breaks_on_the_second)
    n1 = FakeNeuron("n1", loaded={MODEL: GiB}, reply="one two three four")
    async with cluster(n1, catalogue=[spec(MODEL)]) as c:
        with server_logs(logs):
            body = chat_body(MODEL, stream=True)
            response = await c.http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            assert '"code": "internal_error"' in response.text
            errors = c.gateway.metrics.errors.labels(MODEL, "n1", "openai", "internal_error")
            await eventually(lambda: errors._value.get() == 1)
    assert len(logs.tracebacks()) == 1, [r.getMessage() for r in logs.tracebacks()]
    assert len(_failures(logs)) == 1
