"""Loads, unloads and requests that overlap, on a real worker thread with stand-in weights and
engine (no torch model): what one of them leaves behind must not break the others."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from cortex.core.catalogue import ModelSpec
from cortex.core.config import NeuronConfig, NeuronSection
from cortex.core.errors import ModelNotFound
from cortex.core.fleet import LoadRequest, ModelState
from cortex.neuron import loader
from cortex.neuron.devices import Device
from cortex.neuron.engine import EngineLoad, Sequence
from cortex.neuron.generation import Finished, SamplingParams, TextDelta
from cortex.neuron.replica import Replica, ServedModel
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.worker import DeviceWorker

MODEL = "m"
SHARE = 2**20


class EndlessEngine:
    """One text delta per sequence per step, never done on its own (the Engine's interface)."""

    def __init__(self) -> None:
        self.sequences: list[Sequence] = []
        self.load = EngineLoad()

    def add(self, seq: Sequence) -> None:
        self.sequences.append(seq)
        self.load = EngineLoad(running=len(self.sequences))

    def has_work(self) -> bool:
        return bool(self.sequences)

    def step(self) -> None:
        for seq in list(self.sequences):
            if seq.cancelled:
                self.sequences.remove(seq)
                seq.emit(Finished("cancelled", 1, 0))
            else:
                seq.emit(TextDelta("x", 1))
        self.load = EngineLoad(running=len(self.sequences))

    def fail_all(self, message: str, reason: str = "error") -> None:
        for seq in self.sequences:
            seq.emit(Finished(reason, 1, 0, error=message))  # type: ignore[arg-type]
        self.sequences = []
        self.load = EngineLoad()

    def close(self, message: str) -> None:
        self.fail_all(message, "cancelled")


def _weights(kind: str) -> loader.LoadedWeights:
    embeddings = SimpleNamespace(num_embeddings=100)
    model = SimpleNamespace(get_input_embeddings=lambda: embeddings)
    return loader.LoadedWeights(model, None, kind, 64, {}, set())  # type: ignore[arg-type]


@pytest.fixture
def runtime() -> Iterator[NeuronRuntime]:
    """A runtime whose loads put stand-in weights (and an EndlessEngine) on a real cpu-0 worker."""
    section = NeuronSection(max_running=1, max_queue=4, queue_timeout=30)
    specs = [
        ModelSpec(id=MODEL, source="file:/nowhere", kind="chat"),
        ModelSpec(id="e", source="file:/nowhere", kind="embedding"),
    ]
    runtime = NeuronRuntime(NeuronConfig(neuron=section), catalogue=specs)
    device = Device("cpu-0", 0, "cpu", "test cpu", 2**30)
    worker = DeviceWorker(device)
    worker.start()
    runtime.devices, runtime.workers = [device], {device.id: worker}

    async def place_and_load(replica: Replica, request: LoadRequest) -> None:
        device.committed += SHARE
        replica.devices, replica.memory = [device], SHARE
        served = ServedModel(replica, _weights(replica.spec.kind), worker, section)
        if replica.spec.kind == "chat":
            engine = EndlessEngine()
            await worker.run(lambda: worker.attach(engine))
            served.engine = engine  # type: ignore[assignment]
        replica.served, replica.state = served, ModelState.READY

    runtime._place_and_load = place_and_load  # type: ignore[method-assign]
    yield runtime
    worker.stop()


def _hold(worker: DeviceWorker) -> threading.Event:
    """Keep the worker busy until the returned event is set: jobs queue up behind it."""
    gate = threading.Event()
    worker.call_soon(lambda: gate.wait(30) and None)
    return gate


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_a_reload_during_an_unload_is_not_taken_with_it(runtime: NeuronRuntime) -> None:
    await runtime.load(LoadRequest(model=MODEL))
    old = runtime.replicas[MODEL]
    gate = _hold(runtime.workers["cpu-0"])
    unloading = asyncio.create_task(runtime.unload(MODEL))
    await _until(lambda: old.state is ModelState.UNLOADING)
    reloading = asyncio.create_task(runtime.load(LoadRequest(model=MODEL)))
    gate.set()
    await unloading
    record = await reloading
    assert record.state is ModelState.READY
    new = runtime.replicas[MODEL]
    assert new is not old and runtime.served(MODEL) is new.served
    assert runtime.devices[0].committed == SHARE  # the old copy's share given back, the new kept


async def test_a_request_waiting_for_a_slot_during_an_unload_is_told_the_model_is_gone(
    runtime: NeuronRuntime,
) -> None:
    await runtime.load(LoadRequest(model=MODEL))
    served = runtime.served(MODEL)
    running = served.generate([1, 2], SamplingParams())  # holds the one running slot
    assert isinstance(await anext(running), TextDelta)
    waiting = asyncio.create_task(anext(served.generate([1, 2], SamplingParams())))
    await _until(lambda: served.admission.queued == 1)
    await runtime.unload(MODEL, force=True)
    events = [event async for event in running]
    assert isinstance(events[-1], Finished) and events[-1].error == "model unloaded"
    assert events[-1].reason == "cancelled"  # a 503 the gateway retries, not a 500
    # It takes the freed slot: the model is gone (which the gateway retries elsewhere), not a
    # sequence left in an engine that nothing steps any more.
    with pytest.raises(ModelNotFound, match="unloaded"):
        await asyncio.wait_for(waiting, 10)
    assert served.admission.running == 0


async def test_an_embedding_waiting_during_an_unload_never_runs_on_released_weights(
    runtime: NeuronRuntime,
) -> None:
    await runtime.load(LoadRequest(model="e"))
    served = runtime.served("e")
    async with served.admission.slot():  # the one running slot
        waiting = asyncio.create_task(served.embed(["hi"]))
        await _until(lambda: served.admission.queued == 1)
        await runtime.unload("e", force=True)
    with pytest.raises(ModelNotFound, match="unloaded"):
        await asyncio.wait_for(waiting, 10)


async def test_a_model_on_a_poisoned_device_can_be_unloaded(runtime: NeuronRuntime) -> None:
    await runtime.load(LoadRequest(model=MODEL))
    device = runtime.devices[0]
    device.healthy, device.error = False, "CUDA error: an illegal memory access"  # as _poison
    await runtime.unload(MODEL, force=True)
    assert MODEL not in runtime.replicas and device.committed == 0


async def test_a_ready_model_on_a_poisoned_device_is_reported_failed(
    runtime: NeuronRuntime,
) -> None:
    """Its replica can serve nothing more: reported ready, the gateway kept routing to it (and,
    its requests failing at once, least-in-flight picked it first every time)."""
    await runtime.load(LoadRequest(model=MODEL))
    device = runtime.devices[0]
    device.healthy, device.error = False, "CUDA error: an illegal memory access"  # as _poison
    (record,) = runtime.status().models
    assert record.state is ModelState.FAILED
    assert record.error == f"device {device.id} is unhealthy: CUDA error: an illegal memory access"
    with pytest.raises(ModelNotFound, match="failed"):
        runtime.served(MODEL)


async def test_stop_unloads_every_model_whatever_one_of_them_raises(
    runtime: NeuronRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    await runtime.load(LoadRequest(model=MODEL))
    await runtime.load(LoadRequest(model="e"))
    stop_engine = runtime._stop_engine

    def failing(served: ServedModel) -> None:
        if served.id == MODEL:
            raise RuntimeError("release failed")
        stop_engine(served)

    monkeypatch.setattr(runtime, "_stop_engine", failing)
    await runtime.stop()
    assert runtime.replicas == {} and runtime.devices[0].committed == 0
    assert not runtime.workers["cpu-0"]._thread.is_alive()


async def test_an_unload_whose_caller_leaves_still_frees_the_weights(
    runtime: NeuronRuntime,
) -> None:
    await runtime.load(LoadRequest(model=MODEL))
    served = runtime.served(MODEL)
    gate = _hold(runtime.workers["cpu-0"])
    unloading = asyncio.create_task(runtime.unload(MODEL, force=True))
    await _until(lambda: served.closed)
    unloading.cancel()  # e.g. the admin's client disconnected
    with pytest.raises(asyncio.CancelledError):
        await unloading
    gate.set()
    await _until(lambda: served.weights.model is None and served.engine is None)
    assert MODEL not in runtime.replicas
