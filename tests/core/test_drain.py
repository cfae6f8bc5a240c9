"""The drain of a shutting-down server (cortex.core.shutdown): what runs may finish for the
grace; when it runs out, what is still open is cut, and only then do the servers exit."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from cortex.core.shutdown import Drain


async def _exited(server: SimpleNamespace) -> None:
    deadline = time.monotonic() + 5
    while not server.should_exit:
        assert time.monotonic() < deadline, "the drain never stopped the server"
        await asyncio.sleep(0.01)


async def test_the_grace_running_out_cuts_what_is_open_before_the_servers_exit() -> None:
    drain = Drain(grace=0.05)
    server = SimpleNamespace(should_exit=False)
    drain.servers.append(server)  # type: ignore[arg-type]
    cuts: list[bool] = []
    drain.active = 1  # a stream that will not end by itself
    with drain.cuttable(lambda: cuts.append(server.should_exit)):
        drain.begin()
        await _exited(server)
    assert cuts == [False] and drain.over


async def test_nothing_is_cut_when_everything_ended_in_time() -> None:
    drain = Drain(grace=5)
    server = SimpleNamespace(should_exit=False)
    drain.servers.append(server)  # type: ignore[arg-type]
    cuts: list[bool] = []
    with drain.cuttable(lambda: cuts.append(True)):
        drain.begin()  # nothing active: the servers exit at once
        await _exited(server)
    assert cuts == [] and not drain.over
