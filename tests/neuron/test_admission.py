"""Admission: bounded running, bounded timed queue, slots handed over in order."""

from __future__ import annotations

import asyncio

import pytest

from cortex.core.errors import NeuronUnavailable, Overloaded
from cortex.neuron.admission import Admission


async def test_full_queue_is_refused_with_retry_after() -> None:
    admission = Admission(max_running=1, max_queue=1, queue_timeout=30)
    async with admission.slot():
        waiter = asyncio.create_task(_hold(admission, None))
        while admission.queued == 0:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            async with admission.slot():
                pass
        assert refused.value.retry_after and refused.value.status == 429
    await waiter
    assert admission.running == 0 and admission.queued == 0


async def test_queue_wait_times_out_as_unavailable() -> None:
    admission = Admission(max_running=1, max_queue=4, queue_timeout=0.05)
    async with admission.slot():
        with pytest.raises(NeuronUnavailable) as timed_out:
            async with admission.slot():
                pass
        assert timed_out.value.status == 503 and timed_out.value.retry_after
    assert admission.running == 0 and admission.queued == 0


async def test_slots_pass_to_waiters_in_order_and_cancelled_waiters_leave() -> None:
    admission = Admission(max_running=1, max_queue=8, queue_timeout=30)
    order: list[int] = []
    release = asyncio.Event()
    first = asyncio.create_task(_hold(admission, release, order, 0))
    while admission.running == 0:
        await asyncio.sleep(0)
    waiters = [asyncio.create_task(_hold(admission, None, order, i)) for i in (1, 2, 3)]
    while admission.queued < 3:
        await asyncio.sleep(0)
    waiters[1].cancel()
    release.set()
    await asyncio.gather(first, waiters[0], waiters[2])
    assert order == [0, 1, 3] and admission.running == 0 and admission.queued == 0


async def _hold(
    admission: Admission,
    release: asyncio.Event | None,
    order: list[int] | None = None,
    name: int = 0,
) -> None:
    """Take a slot, note the order, and keep it until `release` is set (None: give it back at once)."""
    async with admission.slot():
        if order is not None:
            order.append(name)
        if release is not None:
            await release.wait()
