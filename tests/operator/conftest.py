"""Fixtures for the operator tests: the real kopf operator, in this event loop, against kmock's
Kubernetes emulator over HTTP (see operator_harness.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from fakes.cluster import CortexCluster
from operator_harness import FAST, NS, Kube, Operator, first_of

from cortex.operator.cli import run


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    async with CortexCluster() as cluster, kmock.Server(cluster) as server:
        cluster.register(namespaces=(NS,))
        url = str(server.url).rstrip("/")
        # A connection per request: the emulator drops idle keep-alive connections, and a
        # request sent on one just then would hang.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(url, connector=connector) as http:
            yield Kube(cluster, url, http)


@pytest.fixture
def operator(kube: Kube) -> Operator:
    """`async with operator(**config changes):` runs the real operator until the block ends."""

    @contextlib.asynccontextmanager
    async def running(**changes: Any) -> AsyncIterator[None]:
        config = replace(FAST, **changes)

        def login(registry: kopf.OperatorRegistry) -> None:
            @kopf.on.login(registry=registry)
            def emulator(**_: Any) -> kopf.ConnectionInfo:
                return kopf.ConnectionInfo(server=kube.url, default_namespace=NS)

        stop, ready = asyncio.Event(), asyncio.Event()
        before = asyncio.all_tasks()
        task = asyncio.create_task(
            run(config, login=False, customize=login, stop_flag=stop, ready_flag=ready)
        )
        await first_of(ready.wait(), task)
        try:
            yield
        finally:
            # kopf's graceful stop waits seconds for watch streams the emulator never ends;
            # after a moment it is cancelled instead, as a killed pod would be.
            stop.set()
            await asyncio.wait({task}, timeout=1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # A peer's goodbye to the peering object outlives the cancel (kopf shields it); on a
            # connection the emulator dropped it would wait out every retry, and the test's
            # event loop waits for it at the end. A killed pod says no goodbye either.
            await _cancel(t for t in asyncio.all_tasks() - before if _is_kopfs(t))

    return running


def _is_kopfs(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "/kopf/" in code.co_filename


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    left = set(tasks)
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=5)
