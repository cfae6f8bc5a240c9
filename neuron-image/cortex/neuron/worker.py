"""Device workers: one OS thread per device owns its models, caches and forward passes.

Async code never touches a tensor: it submits jobs (`run`) and awaits their results. Between jobs the
thread drives the engines attached to it, one step each, so concurrent sequences share forward passes.
A device error (CUDA) poisons only this worker: it fails its sequences and refuses further work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from cortex.core.errors import DeviceUnhealthy
from cortex.neuron.devices import Device, is_device_fault

log = logging.getLogger(__name__)
T = TypeVar("T")


class Steppable(Protocol):
    """What the worker drives between jobs (the Engine)."""

    def has_work(self) -> bool: ...
    def step(self) -> None: ...
    def fail_all(self, message: str) -> None: ...


class DeviceWorker:
    """The thread that owns one device (named after it: cpu-0, cuda-dev-0, ...)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._engines: list[Steppable] = []
        self._thread = threading.Thread(target=self._loop, name=device.id, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self.device.healthy

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn on this device's thread and await its result; fn is skipped if the caller has
        stopped waiting (cancelled) before its turn."""
        if not self.device.healthy:
            raise DeviceUnhealthy(f"device {self.device.id} is unhealthy: {self.device.error}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # A client that left cancels its request and frees its admission slot; its job would
        # still hold the device (an embedding, or a stall between decode steps) for nobody.
        # Set on the loop, read here: a Future is not for other threads to look at.
        abandoned = threading.Event()
        future.add_done_callback(lambda done: abandoned.set() if done.cancelled() else None)

        def job() -> None:
            if abandoned.is_set():
                return
            try:
                result = fn()
            except BaseException as exc:  # delivered to the awaiting caller
                if is_device_fault(exc):
                    self._poison(exc)
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._jobs.put(job)
        return await future

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queue fn on the device thread without waiting (e.g. a sequence joining its engine)."""
        self._jobs.put(fn)

    def attach(self, engine: Steppable) -> None:
        """Worker thread only: drive this engine between jobs."""
        self._engines.append(engine)

    def detach(self, engine: Steppable) -> None:
        """Worker thread only."""
        if engine in self._engines:
            self._engines.remove(engine)

    def _loop(self) -> None:
        self.device.make_current()
        while True:
            busy = any(engine.has_work() for engine in self._engines)
            try:
                job = self._jobs.get(block=not busy)
            except queue.Empty:
                job = _NO_JOB
            if job is None:
                return
            if job is not _NO_JOB:
                job()
                continue  # drain every queued job before the next step: joins happen at boundaries
            for engine in list(self._engines):
                if not engine.has_work():
                    continue
                if self.device.healthy:
                    self._step(engine)
                else:  # a poisoned device runs nothing more: whatever still arrives fails at once
                    engine.fail_all(f"device {self.device.id} is unhealthy: {self.device.error}")

    def _step(self, engine: Steppable) -> None:
        try:
            engine.step()
        except Exception as exc:
            log.exception("engine step failed on %s", self.device.id)
            engine.fail_all(f"{type(exc).__name__}: {exc}")
            if is_device_fault(exc):
                self._poison(exc)

    def _poison(self, exc: BaseException) -> None:
        self.device.healthy = False
        self.device.error = f"{type(exc).__name__}: {exc}"
        log.error("device %s poisoned: %s", self.device.id, self.device.error)
        for engine in self._engines:
            engine.fail_all(f"device {self.device.id} failed: {self.device.error}")


def _NO_JOB() -> None:  # sentinel: the queue was empty and an engine has work
    return None


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
