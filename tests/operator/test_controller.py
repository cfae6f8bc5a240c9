"""The controller's probing, against a neuron answering over httpx's mock transport: of two probes
in flight, the answer to the later question is kept, whichever arrives last."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from operator_harness import FAST, NS, until
from test_reconcile import GIB, answer, nr

from cortex.core.client import NeuronClient
from cortex.core.fleet import ModelState
from cortex.operator.controller import Controller


async def test_a_slow_older_probe_does_not_overwrite_a_newer_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timer's probe is asked while a load is under way and answers late; the probe after the
    load is asked later and answers first. The replica must stay ready, not go back to loading."""
    loading = answer("a", chat=(ModelState.LOADING, GIB))
    ready = answer("a", chat=(ModelState.READY, GIB))
    late = asyncio.Event()
    asked: list[int] = []

    async def neuron(_: httpx.Request) -> httpx.Response:
        asked.append(len(asked))
        if len(asked) == 1:
            await late.wait()
            return httpx.Response(200, json=loading.model_dump(mode="json"))
        return httpx.Response(200, json=ready.model_dump(mode="json"))

    ticks = itertools.count(1_800_000_000)
    controller = Controller(FAST, clock=lambda: float(next(ticks)))
    client = NeuronClient("http://a:13131", transport=httpx.MockTransport(neuron))
    monkeypatch.setattr(controller, "client", lambda *_, **__: client)
    timer_probe = asyncio.create_task(controller.probe(NS, nr("a")))
    await until(lambda: asked, "the first probe to be asked")
    after_load = await controller.probe(NS, nr("a"))
    late.set()
    assert await timer_probe is after_load
    kept = controller.probes[(NS, "a")]
    assert kept.status is not None and kept.status.models[0].state == ModelState.READY
    await client.aclose()
