"""Admission: bounded running, bounded timed queue, slots handed over in order and fairly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from cortex.core.config import NeuronSection
from cortex.core.errors import Overloaded, QueueTimeout
from cortex.neuron.admission import Admission
from cortex.neuron.serving import principal_of


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


async def test_queue_wait_times_out_as_busy_not_unavailable() -> None:
    admission = Admission(max_running=1, max_queue=4, queue_timeout=0.05)
    async with admission.slot():
        with pytest.raises(QueueTimeout) as timed_out:
            async with admission.slot():
                pass
        err = timed_out.value
        assert err.status == 429 and err.code == "queue_timeout" and err.retry_after
        assert "busy" in err.message
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


async def test_one_request_is_not_starved_by_a_principal_with_many() -> None:
    # The heavy principal fills every slot and the whole queue; the light one is still queued,
    # and the next free slot is its, ahead of the heavy one's older waiters.
    admission = Admission(max_running=2, max_queue=4, queue_timeout=30)
    order: list[str] = []
    release = asyncio.Event()
    heavy = [asyncio.create_task(_hold(admission, release, order, "heavy")) for _ in range(6)]
    while admission.queued < 4:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        async with admission.slot("heavy"):
            pass
    light = asyncio.create_task(_hold(admission, None, order, "light"))
    while admission.queued < 5:
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*heavy, light)
    assert order[:3] == ["heavy", "heavy", "light"]
    assert admission.running == 0 and admission.queued == 0 and not admission.holding


async def test_max_per_principal_keeps_slots_for_others() -> None:
    admission = Admission(max_running=4, max_queue=8, queue_timeout=30, max_per_principal=2)
    release = asyncio.Event()
    heavy = [asyncio.create_task(_hold(admission, release, None, "heavy")) for _ in range(3)]
    while admission.running + admission.queued < 3:
        await asyncio.sleep(0)
    assert admission.running == 2 and admission.queued == 1  # a slot is free, but not for it
    async with asyncio.timeout(1):  # the light principal starts at once
        async with admission.slot("light"):
            assert admission.holding == {"heavy": 2, "light": 1}
    release.set()
    await asyncio.gather(*heavy)
    assert admission.running == 0 and admission.queued == 0


async def test_a_request_of_several_choices_takes_their_slots_together_and_first() -> None:
    """Slots freed while a request of n choices waits for n are kept for it: later requests of
    one slot do not pass it, however many slots stand free meanwhile."""
    admission = Admission(max_running=4, max_queue=8, queue_timeout=30)
    order: list[Any] = []
    release = asyncio.Event()
    held = asyncio.create_task(_hold(admission, release, order, "held", slots=2))
    while admission.running < 2:
        await asyncio.sleep(0)
    three = asyncio.create_task(_hold(admission, None, order, "three", slots=3))
    while admission.queued < 1:
        await asyncio.sleep(0)
    one = asyncio.create_task(_hold(admission, None, order, "one"))
    while admission.queued < 2:
        await asyncio.sleep(0)
    assert admission.running == 2  # two slots free, kept for the request of three
    release.set()
    await asyncio.gather(held, three, one)
    assert order == ["held", "three", "one"] and admission.running == 0 and not admission.holding
    assert admission.most == 4
    with pytest.raises(ValueError):  # never grantable: the API refuses it first (a 400)
        async with admission.slot("anonymous", 5):
            pass


async def _hold(
    admission: Admission,
    release: asyncio.Event | None,
    order: list[Any] | None = None,
    name: Any = 0,
    slots: int = 1,
) -> None:
    """Take `slots` slots, note the order, and keep them until `release` is set (None: give them
    back at once). A string name is also the principal."""
    async with admission.slot(name if isinstance(name, str) else "anonymous", slots):
        if order is not None:
            order.append(name)
        if release is not None:
            await release.wait()


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "client": ("10.0.0.7", 5555)})


def test_the_principal_is_the_gateways_word_only_when_the_gateway_is_trusted() -> None:
    open_neuron = NeuronSection(name="n")
    assert principal_of(_request({"x-cortex-principal": "alice"}), open_neuron) == "alice"
    assert principal_of(_request({}), open_neuron) == "10.0.0.7"
    guarded = NeuronSection(name="n", admin_token="s3cret")
    forged = {"x-cortex-principal": "alice"}
    assert principal_of(_request(forged), guarded) == "10.0.0.7"
    trusted = {**forged, "authorization": "Bearer s3cret"}
    assert principal_of(_request(trusted), guarded) == "alice"


def test_a_token_kept_in_a_file_guards_the_principal_too(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    guarded = NeuronSection(name="n", admin_token_file=token_file)
    forged = {"x-cortex-principal": "alice"}
    assert principal_of(_request(forged), guarded) == "10.0.0.7"
    trusted = {**forged, "authorization": "Bearer s3cret"}
    assert principal_of(_request(trusted), guarded) == "alice"
    token_file.unlink()  # a Secret unmounted: nobody's word is taken
    assert principal_of(_request(trusted), guarded) == "10.0.0.7"
