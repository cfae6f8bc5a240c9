"""Device workers: jobs run on the device's own thread, engines step between jobs, faults poison."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cortex.core.errors import DeviceUnhealthy
from cortex.neuron.devices import Device, is_device_fault
from cortex.neuron.worker import DeviceWorker


class ScriptedEngine:
    """Has `steps` steps of work; raises `fault` on the step numbered `fail_at`."""

    def __init__(
        self, steps: int, fail_at: int | None = None, fault: Exception | None = None
    ) -> None:
        self.steps, self.fail_at, self.fault = steps, fail_at, fault
        self.done = 0
        self.threads: set[str] = set()
        self.failed: str | None = None
        self.finished = threading.Event()

    def has_work(self) -> bool:
        return self.done < self.steps and self.failed is None

    def step(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.done += 1
        if self.done == self.fail_at and self.fault is not None:
            raise self.fault
        if self.done == self.steps:
            self.finished.set()

    def fail_all(self, message: str) -> None:
        self.failed = message
        self.finished.set()


@pytest.fixture
def worker() -> DeviceWorker:
    worker = DeviceWorker(Device("cpu-0", 0, "cpu", "test cpu", 2**30))
    worker.start()
    yield worker
    worker.stop()


async def test_jobs_run_on_the_device_thread(worker: DeviceWorker) -> None:
    assert await worker.run(lambda: threading.current_thread().name) == "cpu-0"
    with pytest.raises(ZeroDivisionError):
        await worker.run(lambda: 1 / 0)
    assert worker.healthy  # an ordinary error is the caller's, not the device's


async def test_attached_engines_step_to_completion_on_the_device_thread(
    worker: DeviceWorker,
) -> None:
    engine = ScriptedEngine(steps=50)
    await worker.run(lambda: worker.attach(engine))
    assert await asyncio.to_thread(engine.finished.wait, 30)
    assert engine.done == 50 and engine.threads == {"cpu-0"}


async def test_an_ordinary_step_error_fails_the_batch_but_not_the_device(
    worker: DeviceWorker,
) -> None:
    engine = ScriptedEngine(steps=10, fail_at=3, fault=ValueError("bad shape"))
    await worker.run(lambda: worker.attach(engine))
    assert await asyncio.to_thread(engine.finished.wait, 30)
    assert engine.failed and "bad shape" in engine.failed
    assert worker.healthy and await worker.run(lambda: 42) == 42


async def test_a_cuda_error_poisons_only_this_worker(worker: DeviceWorker) -> None:
    other = DeviceWorker(Device("cuda-dev-1", 1, "cpu", "stand-in", 2**30))
    other.start()
    try:
        fault = RuntimeError("CUDA error: an illegal memory access was encountered")
        engine = ScriptedEngine(steps=10, fail_at=2, fault=fault)
        await worker.run(lambda: worker.attach(engine))
        assert await asyncio.to_thread(engine.finished.wait, 30)  # the worker refuses jobs now
        assert engine.failed and "illegal memory access" in engine.failed
        assert not worker.healthy and "CUDA error" in (worker.device.error or "")
        assert worker.device.status().healthy is False
        with pytest.raises(DeviceUnhealthy):
            await worker.run(lambda: 1)
        late = ScriptedEngine(steps=5)  # work that still reaches the poisoned worker never runs
        worker.call_soon(lambda: worker.attach(late))
        assert await asyncio.to_thread(late.finished.wait, 30)
        assert late.done == 0 and late.failed and "unhealthy" in late.failed
        assert other.healthy and await other.run(lambda: 7) == 7
    finally:
        other.stop()


async def test_a_job_whose_caller_left_before_its_turn_never_runs(worker: DeviceWorker) -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking() -> None:
        started.set()
        release.wait(30)

    busy = asyncio.create_task(worker.run(blocking))
    assert await asyncio.to_thread(started.wait, 30)
    gone = asyncio.create_task(worker.run(lambda: ran.append("gone")))
    await asyncio.sleep(0)  # its job is queued behind the blocking one
    gone.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await gone
    release.set()
    await busy
    assert await worker.run(lambda: "after") == "after"  # jobs run in order: its turn has passed
    assert ran == []


def test_fault_classification() -> None:
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(MemoryError())


async def test_a_cuda_worker_makes_its_gpu_current_on_its_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: torch.cuda.set_device is recorded instead of called. Without it, what a
    # library allocates with no device named on cuda-dev-1's thread would land on GPU 0.
    import torch

    current: list[tuple[str, int]] = []
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda index: current.append((threading.current_thread().name, index)),
    )
    workers = [
        DeviceWorker(Device("cuda-dev-1", 1, "cuda", "stand-in", 2**30)),
        DeviceWorker(Device("cpu-0", 0, "cpu", "test cpu", 2**30)),
    ]
    for each in workers:
        each.start()
    try:
        assert [await each.run(lambda: 1) for each in workers] == [1, 1]
    finally:
        for each in workers:
            each.stop()
    assert current == [("cuda-dev-1", 1)]  # the CPU worker sets nothing
