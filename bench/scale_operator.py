"""The real operator at fleet scale: in-process kopf against kmock's emulator over HTTP, with many
fake neurons over real HTTP (bench/scale_fleet.py, both servers in processes of their own).

Neuron objects are created first and the operator started; once every neuron is probed, the
ModelPlacements are created in a burst and the clock runs until all of them are Ready. Then the
fleet is watched at rest for a while: the operator's timers still reconcile every placement once a
probe interval, and it has to keep up. Reconciles are counted by wrapping `Controller.reconcile`
(and the plans computed in it by wrapping `plan_fleet` where planning.py calls it): instrumentation
only, nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import pstats
import random
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

import cortex.operator.controller as controller_module
import cortex.operator.planning as planning_module
from bench.processes import PYTHON, ServerProcess, answers, free_port
from cortex.core.resources import API_VERSION
from cortex.operator.cli import run
from cortex.operator.config import OperatorConfig

NS = "default"
NEURONS = f"/apis/{API_VERSION}/namespaces/{NS}/neurons"
PLACEMENTS = f"/apis/{API_VERSION}/namespaces/{NS}/modelplacements"
EVENTS = f"/api/v1/namespaces/{NS}/events"
SIZES_GIB = (1, 2, 3)


@dataclass(frozen=True)
class Scale:
    """What one operator run is asked to do."""

    neurons: int
    placements: int
    neuron_gib: float = 24.0
    load_delay: float = 0.5  # seconds each fake load takes
    probe_interval: float = 5.0  # the operator's default
    timeout: float = 120.0  # give up waiting for Ready after this long
    steady: float = 10.0  # seconds watched at rest once all are Ready
    poll: float = 1.0  # how often the driver lists the placements


@dataclass
class Counts:
    """What the wrappers saw: reconciles and the time spent planning in them."""

    reconciles: int = 0
    plans: int = 0
    plan_seconds: float = 0.0
    profile_next: bool = False  # profile the next plan_fleet() call
    profile: list[str] = field(default_factory=list)  # its heaviest functions


@dataclass
class OperatorRun:
    """The figures of one run."""

    scale: Scale
    neurons_probed_s: float = 0.0
    create_s: float = 0.0  # creating the placements (the clock starts before the first)
    all_ready_s: float | None = None  # None: not all Ready before the timeout
    ramp_cpu_s: float = 0.0  # this process's CPU (operator and driver) over the ramp
    ramp_s: float = 0.0  # from the first create until all Ready or the timeout
    ready: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    curve: list[tuple[float, int]] = field(default_factory=list)  # (seconds, placements Ready)
    ramp_reconciles: int = 0
    ramp_plans: int = 0  # plans computed: one per change, not per reconcile
    ramp_plan_s: float = 0.0
    steady_reconciles: int = 0
    steady_plans: int = 0
    steady_s: float = 0.0
    steady_plan_ms: float = 0.0  # mean plan_fleet time at rest
    plan_profile: list[str] = field(default_factory=list)  # the first full-fleet plan, cProfile
    loads: int = 0  # load calls the fake neurons received
    events: int = 0  # Kubernetes Events the operator posted
    event_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # a few LoadFailed messages, verbatim
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, over the whole run

    @property
    def ramp_rate(self) -> float:
        return self.ramp_reconciles / self.ramp_s if self.ramp_s else 0.0

    @property
    def steady_rate(self) -> float:
        return self.steady_reconciles / self.steady_s if self.steady_s else 0.0


def rss_mib() -> tuple[float, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def neuron_object(index: int, port: int) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Neuron",
        "metadata": {"name": f"fake-{index:04d}", "namespace": NS},
        "spec": {
            "endpoint": f"http://127.0.0.1:{port}/n/{index}",
            "labels": {"rack": str(index % 4)},
        },
    }


def placement_object(index: int, rng: random.Random) -> dict[str, Any]:
    """min 1, max 2; sizes 1-3 GiB; priorities 0-2; a tenth pinned."""
    gib = rng.choice(SIZES_GIB)
    model = f"m-{index:04d}"
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPlacement",
        "metadata": {"name": model, "namespace": NS},
        "spec": {
            "model": model,
            "source": f"file:/models/{model}?gib={gib}",  # the fake neuron reads its size here
            "replicas": {"min": 1, "max": 2},
            "pinned": index % 10 == 0,
            "priority": index % 3,
            "resources": {"memory": f"{gib}Gi"},
        },
    }


async def create_all(
    http: aiohttp.ClientSession, path: str, bodies: list[dict[str, Any]], parallel: int = 16
) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(body: dict[str, Any]) -> None:
        async with gate, http.post(path, json=body) as response:
            if response.status >= 400:
                raise RuntimeError(f"create refused: {await response.text()}")

    await asyncio.gather(*(one(body) for body in bodies))


async def listed(http: aiohttp.ClientSession, path: str) -> list[dict[str, Any]]:
    async with http.get(path) as response:
        response.raise_for_status()
        items: list[dict[str, Any]] = (await response.json())["items"]
        return items


def phase_of(obj: dict[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "none")


async def wait_for(check: Callable[[], Awaitable[bool]], deadline: float, every: float) -> bool:
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)  # poll with a deadline
    return True


@contextlib.contextmanager
def counting() -> Any:
    """Wrap Controller.reconcile and plan_fleet to count reconciles and time the planning."""
    counts = Counts()
    original_reconcile = controller_module.Controller.reconcile
    original_plan = planning_module.plan_fleet

    async def reconcile(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts.reconciles += 1
        return await original_reconcile(self, *args, **kwargs)

    def plan_fleet(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        profiler = cProfile.Profile() if counts.profile_next else None
        counts.profile_next = False
        try:
            if profiler is None:
                return original_plan(*args, **kwargs)
            result = profiler.runcall(original_plan, *args, **kwargs)
            counts.profile = _heaviest(profiler)
            return result
        finally:
            counts.plans += 1
            counts.plan_seconds += time.perf_counter() - started

    controller_module.Controller.reconcile = reconcile  # type: ignore[method-assign]
    planning_module.plan_fleet = plan_fleet
    try:
        yield counts
    finally:
        controller_module.Controller.reconcile = original_reconcile  # type: ignore[method-assign]
        planning_module.plan_fleet = original_plan


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _heaviest(profiler: cProfile.Profile, count: int = 12) -> list[str]:
    """The profile's heaviest cortex functions by cumulative time, one line each."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_stats("cortex", count)
    lines = [line.strip() for line in text.getvalue().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("ncalls")), len(lines))
    return [line for line in lines[start:] if line]


@contextlib.asynccontextmanager
async def operator(url: str, config: OperatorConfig) -> AsyncIterator[asyncio.Task[None]]:
    """The real operator, in this event loop, logged in to the emulator."""

    def login(registry: kopf.OperatorRegistry) -> None:
        @kopf.on.login(registry=registry)
        def emulator(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, default_namespace=NS)

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run(config, login=False, customize=login, stop_flag=stop, ready_flag=ready)
    )
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({waiter, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        raise RuntimeError("the operator stopped before it was ready")
    try:
        yield task
    finally:
        stop.set()  # kopf waits on watch streams the emulator never ends: cancel after a moment
        await asyncio.wait({task}, timeout=2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def servers(scale: Scale) -> tuple[ServerProcess, ServerProcess]:
    cluster_port, neurons_port = free_port(), free_port()
    fleet = [PYTHON, "-m", "bench.scale_fleet"]
    cluster = ServerProcess(
        "scale-cluster",
        [*fleet, "cluster", "--port", str(cluster_port)],
        answers("/api/v1/namespaces"),
        base_url=f"http://127.0.0.1:{cluster_port}",
    )
    neurons = ServerProcess(
        "scale-neurons",
        [
            *fleet,
            "neurons",
            "--port",
            str(neurons_port),
            "--count",
            str(scale.neurons),
            "--memory-gib",
            str(scale.neuron_gib),
            "--load-delay",
            str(scale.load_delay),
        ],
        answers("/health"),
        base_url=f"http://127.0.0.1:{neurons_port}",
    )
    return cluster, neurons


async def measure(scale: Scale) -> OperatorRun:
    """Start the servers, run the operator, and time the fleet to Ready."""
    cluster, neurons = servers(scale)
    with cluster, neurons:
        port = int(neurons.base_url.rsplit(":", 1)[1])
        result = await _drive(scale, cluster.base_url, port)
        result.cpu_s["emulator"] = round(cluster.cpu_seconds(), 1)
        result.cpu_s["fake neurons"] = round(neurons.cpu_seconds(), 1)
        async with aiohttp.ClientSession() as http, http.get(f"{neurons.base_url}/health") as r:
            result.loads = (await r.json())["loads"]
    return result


async def _drive(scale: Scale, url: str, neurons_port: int) -> OperatorRun:
    result = OperatorRun(scale)
    rng = random.Random(5)
    config = OperatorConfig(
        namespaces=(NS,), probe_interval=scale.probe_interval, standalone=True, liveness=None
    )
    # A connection per request: the emulator drops idle keep-alive connections.
    connector = aiohttp.TCPConnector(force_close=True)
    cpu = _cpu_seconds()
    async with aiohttp.ClientSession(url, connector=connector) as http:
        await create_all(
            http, NEURONS, [neuron_object(i, neurons_port) for i in range(scale.neurons)]
        )
        result.rss_before_mib = rss_mib()[0]
        with counting() as counts:
            async with operator(url, config):
                started = time.monotonic()

                async def probed() -> bool:
                    items = await listed(http, NEURONS)
                    return sum(phase_of(n) == "Ready" for n in items) == scale.neurons

                if not await wait_for(probed, started + scale.timeout, 0.25):
                    raise RuntimeError("the neurons were not all probed in time")
                result.neurons_probed_s = time.monotonic() - started
                await _ramp(scale, http, counts, result, rng)
                if result.all_ready_s is not None:
                    await _steady(scale, http, counts, result)
                events = await listed(http, EVENTS)
                result.events = len(events)
                result.event_reasons = dict(Counter(str(e.get("reason")) for e in events))
                result.failures = [
                    str(e.get("message")) for e in events if e.get("reason") == "LoadFailed"
                ][:5]
                result.rss_after_mib, result.rss_peak_mib = rss_mib()
    result.cpu_s["operator"] = round(_cpu_seconds() - cpu, 1)
    return result


async def _ramp(
    scale: Scale, http: aiohttp.ClientSession, counts: Counts, result: OperatorRun,
    rng: random.Random,
) -> None:  # fmt: skip
    """Create the placements; poll until every one is Ready or the timeout passes."""
    before, plans, planned = counts.reconciles, counts.plans, counts.plan_seconds
    cpu = _cpu_seconds()
    t0 = time.monotonic()
    bodies = [placement_object(i, rng) for i in range(scale.placements)]
    await create_all(http, PLACEMENTS, bodies)
    result.create_s = time.monotonic() - t0
    counts.profile_next = True  # the next plan is over every placement
    deadline = t0 + scale.timeout
    while True:
        items = await listed(http, PLACEMENTS)
        now = time.monotonic() - t0
        phases = Counter(phase_of(p) for p in items)
        result.ready, result.phases = phases["Ready"], dict(phases)
        result.curve.append((round(now, 2), result.ready))
        if result.ready == scale.placements:
            result.all_ready_s = now
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(scale.poll)
    result.ramp_s = time.monotonic() - t0
    result.ramp_cpu_s = round(_cpu_seconds() - cpu, 1)
    result.ramp_reconciles = counts.reconciles - before
    result.ramp_plans = counts.plans - plans
    result.ramp_plan_s = counts.plan_seconds - planned
    result.plan_profile = counts.profile


async def _steady(
    scale: Scale, http: aiohttp.ClientSession, counts: Counts, result: OperatorRun
) -> None:
    """Watch the Ready fleet: the reconciles its timers drive, and the plans (if any) they make."""
    reconciles, plans, planned = counts.reconciles, counts.plans, counts.plan_seconds
    started = time.monotonic()
    await asyncio.sleep(scale.steady)  # a fixed observation window, not a wait for state
    result.steady_s = time.monotonic() - started
    result.steady_reconciles = counts.reconciles - reconciles
    done = result.steady_plans = counts.plans - plans
    result.steady_plan_ms = (counts.plan_seconds - planned) / done * 1000 if done else 0.0
    items = await listed(http, PLACEMENTS)
    result.phases = dict(Counter(phase_of(p) for p in items))
