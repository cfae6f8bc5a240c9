"""Reading a neuron's stream (gateway/proxy/relay.py): events come in the batches the neuron's
chunks completed them in, so that what arrived together is sent on together and what arrived
apart is sent on apart; [DONE], error events and cut streams end it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from cortex.core.errors import NeuronUnavailable, Overloaded
from cortex.gateway.proxy.relay import upstream_events

ONE = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
TWO = b'data: {"choices": [{"delta": {"content": "b"}}]}\n\n'
PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


class Upstream:
    """A neuron's stream as the proxy reads it, in these chunks."""

    neuron = "n1"

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


async def batches(*chunks: bytes) -> list[list[tuple[bytes, Any]]]:
    return [batch async for batch in upstream_events(Upstream(*chunks))]  # type: ignore[arg-type]


async def test_events_completed_by_one_chunk_come_together() -> None:
    got = await batches(ONE + PING + TWO[:10], TWO[10:], DONE)
    assert [[event for event, _ in batch] for batch in got] == [[ONE, PING], [TWO]]
    assert got[0][0][1] == {"choices": [{"delta": {"content": "a"}}]} and got[0][1][1] is None


async def test_events_that_came_apart_stay_apart_and_done_ends_the_stream() -> None:
    got = await batches(ONE, TWO.replace(b"\n", b"\r\n"), DONE + ONE)
    assert [[event for event, _ in batch] for batch in got] == [[ONE], [TWO]]


async def test_an_error_event_comes_after_the_events_before_it() -> None:
    error = b'data: {"error": {"message": "busy", "code": "overloaded"}}\n\n'
    seen: list[list[tuple[bytes, Any]]] = []
    with pytest.raises(Overloaded, match="busy"):
        async for batch in upstream_events(Upstream(ONE + error)):  # type: ignore[arg-type]
            seen.append(batch)
    assert [[event for event, _ in batch] for batch in seen] == [[ONE]]


async def test_a_stream_cut_before_done_is_the_neurons_failure() -> None:
    with pytest.raises(NeuronUnavailable, match="without \\[DONE\\]"):
        await batches(ONE, PING)
    with pytest.raises(ValueError):  # a cut half-way through an event is garbage
        await batches(ONE, TWO[:12])
