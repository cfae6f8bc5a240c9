"""Placement execution: the shared planner's actions turned into neuron load and unload calls.

Planning happens under one lock, and every action a plan chooses is reserved at once (loads as
arriving replicas holding their memory, unloads as leaving ones; a defrag move's unload only when
it begins), so a plan made while another one is still executing never double-books memory or
evicts the same replica twice. The placer alone owns these reservations; the snapshot joins them
with the fleet's polls, and routing asks the placer, so a leaving replica gets no new requests.
The actions themselves run outside the lock, in plan order (evictions before the load they make
room for; a defrag move's load before its unload).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from cortex.core.errors import (
    CapacityExhausted,
    CortexError,
    FleetConflict,
    ModelLoadFailed,
    ModelNotFound,
    NeuronUnavailable,
    Shortfall,
)
from cortex.core.fleet import LoadedModel, LoadRequest, ModelState
from cortex.core.placement.model import Action, Demand, Load, NeuronView, Plan, Policy, Unload
from cortex.core.placement.planner import plan
from cortex.core.placement.snapshot import Reservations, snapshot
from cortex.gateway.catalogue import LiveCatalogue, ModelAvailability
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.plan_scope import describe, is_move, needed_for
from cortex.gateway.registry import Fleet
from cortex.gateway.reservation_book import ReservationBook

log = logging.getLogger(__name__)

# How often a load the neuron answered early (still loading) is re-polled.
LOAD_POLL_INTERVAL = 0.25
# Plans tried for one demand before giving up (a plan can be undone by a racing eviction).
MAX_PLANS = 3
# A neuron answers a load only once the model is ready: a first GGUF conversion or a large hf:
# model takes many minutes, past the read timeout of inference calls ([gateway] request_timeout).
LOAD_READ_TIMEOUT = 1800.0

T = TypeVar("T")
Waiting = Callable[[], Mapping[str, int]]  # clients waiting per model, read when a plan is made


class EvictionRefused(NeuronUnavailable):
    """A neuron kept a replica a plan evicted (a request arrived since): the room is not there."""


class RoomBusy(NeuronUnavailable):
    """The room a model needs is held by replicas that will settle (in flight, loading, unloading,
    wanted by other waiting clients): it frees without anyone's help (`Plan.blocked`)."""


def _no_one_else() -> Mapping[str, int]:
    return {}


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _room(free: Sequence[int]) -> str:
    """What the neurons a model may use have free, for a refusal that says what it needs."""
    if len(free) == 1:
        return f"its neuron has {_mib(free[0])} free"
    return f"the most free on one of its {len(free)} neurons is {_mib(max(free))}, {_mib(sum(free))} in all"


class Placer:
    """Plans with the shared planner and applies the plans to the fleet."""

    def __init__(
        self,
        fleet: Fleet,
        catalogue: LiveCatalogue,
        policy: Policy,
        metrics: GatewayMetrics,
        *,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet, self.catalogue, self.policy, self.metrics = fleet, catalogue, policy, metrics
        self.retry_after = retry_after
        self.clock = clock
        self._lock = asyncio.Lock()
        self._loads: dict[tuple[str, str], asyncio.Task[LoadedModel]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._reconciling: asyncio.Task[None] | None = None
        self._unplaceable: dict[str, str] = {}
        # Also told when a load begins: a placement may wait for it. It beats the fleet's pulse,
        # which a placement waiting for room wakes on.
        self.book = ReservationBook(fleet.changes)
        # Why each model waiting for room waits (place's `patience`), while it does.
        self.awaiting_room: dict[str, str] = {}
        # Seconds the last successful load of each (neuron, model) took: the `cost` strategy's cost.
        self.load_seconds: dict[tuple[str, str], float] = {}

    async def aclose(self) -> None:
        tasks = [*self._background, *self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- where replicas are, reservations included

    def ready(self, model: str) -> list[str]:
        """Neurons to route `model` to: ready there and healthy, and not being unloaded by us."""
        return [
            name
            for name in self.fleet.polled(model, ModelState.READY)
            if not self.reservations.is_leaving(name, model)
        ]

    def loading(self, model: str) -> list[str]:
        """Healthy neurons where `model` is arriving: polled loading, or a load we began that the
        neuron does not report yet."""
        names = self.fleet.polled(model, ModelState.LOADING)
        for neuron, arriving in self.reservations.arriving:
            if arriving != model or not self.fleet.healthy(neuron):
                continue  # healthy: also still in the fleet (a reload may take neurons out)
            if self.fleet[neuron].model(model) is None and neuron not in names:
                names.append(neuron)
        return names

    def availability(self, model: str) -> tuple[ModelAvailability, list[str]]:
        """loaded (somewhere ready) | loading | available, and the neurons holding it."""
        ready = self.ready(model)
        if ready:
            return "loaded", ready
        loading = self.loading(model)
        if loading:
            return "loading", loading
        return "available", []

    # -- on demand

    async def place(
        self, model: str, waiting: Waiting = _no_one_else, *, patience: float = 0.0
    ) -> str:
        """A neuron with a ready replica of `model`, loading one (evicting first) when none is.

        `waiting` says how many clients wait for each model: the plan serves the most waited-for
        first. Cancelling abandons a load this call started; loads started elsewhere are only left.
        A neuron refusing the plan (no room for the load, a victim busy) is planned for once more:
        its status, read again on the refusal, may be newer than the poll the plan saw. A refusal
        for room that says the model needs more than the plan assumed (a model of unknown size
        sent on a guess) is planned again with that size, once per size learnt. When only
        replicas that will settle keep the model out (RoomBusy), it plans again at each change of
        the fleet (`Fleet.changes`) for up to `patience` seconds.
        """
        deadline = asyncio.get_running_loop().time() + patience
        refused, plans = False, 0
        last: CortexError | None = None  # the last refusal, reported if the plans run out
        while plans < MAX_PLANS:
            plans += 1
            while not (ready := self.ready(model)) and await self._wait_in_transit(model):
                pass  # a replica arrived or left: look again
            if ready:
                return ready[0]
            async with self._lock:
                if self.ready(model) or self._in_transit(model):
                    continue  # another placement got there while this one waited for the lock
                change = self.fleet.changes.next()  # taken before planning: no change is missed
                try:
                    load, actions = self._plan_demand(model, waiting())
                except RoomBusy as busy:
                    blocked: RoomBusy | None = busy
                else:
                    blocked = None
            if blocked is not None:
                await self._await_room(model, blocked, change, deadline)
                plans -= 1  # a wait for room is no plan tried
                continue
            try:
                await self._execute(actions)
            except (CapacityExhausted, EvictionRefused) as err:
                last = err
                if (self._size(model) or 0) > load.memory:
                    continue  # the refusal said how much it needs: plan with that (`_load`)
                if refused:
                    raise
                refused = True
                continue
            if self.ready(model):
                self.metrics.cold_starts.labels(model, load.neuron).inc()
        ready = self.ready(model)
        if ready:
            return ready[0]
        if last is not None:
            raise last
        raise NeuronUnavailable(
            f"model {model!r} could not be placed: its replicas keep disappearing",
            retry_after=self.retry_after,
        )

    async def _await_room(
        self, model: str, busy: RoomBusy, change: asyncio.Event, deadline: float
    ) -> None:
        """Wait for the fleet's next change, or raise `busy` once `deadline` passes."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise busy
        self.awaiting_room[model] = busy.message
        try:
            await asyncio.wait_for(change.wait(), left)
        except TimeoutError:
            raise busy from None
        finally:
            self.awaiting_room.pop(model, None)

    def _in_transit(self, model: str) -> bool:
        return self._arriving(model) is not None or bool(self._leaving(model))

    async def _wait_in_transit(self, model: str) -> bool:
        """Wait out a replica of `model` on its way in or out; False when there is none."""
        arriving = self._arriving(model)
        if arriving is not None:
            await self._join(model, *arriving)
            return True
        leaving = self._leaving(model)
        if leaving:
            # Too late to keep it (an idle unload or an eviction is sent): plan it back once gone.
            await self.book.until(
                lambda: not any(self.reservations.is_leaving(n, model) for n in leaving)
            )
            return True
        return False

    def _leaving(self, model: str) -> list[str]:
        """Healthy neurons where `model` is ready and we are unloading it."""
        return [
            name
            for name in self.fleet.polled(model, ModelState.READY)
            if self.reservations.is_leaving(name, model)
        ]

    def _arriving(self, model: str) -> tuple[str, asyncio.Task[LoadedModel] | None] | None:
        """A replica on its way: a load this gateway runs, or one a poll shows loading."""
        for (neuron, loading), task in self._loads.items():
            if loading == model and not task.done():  # a done one has nothing left to wait for
                return neuron, task
        for neuron in self.loading(model):
            return neuron, None
        return None

    async def _join(self, model: str, neuron: str, task: asyncio.Task[LoadedModel] | None) -> None:
        key = (neuron, model)
        if task is None and key in self.reservations.arriving:
            # Planned, and behind another action of its plan (an eviction): wait for it to begin.
            await self.book.until(
                lambda: key in self._loads or key not in self.reservations.arriving
            )
            task = self._loads.get(key)
            if task is None:
                return  # given up before it began: plan again
        if task is not None:
            # Its outcome, not its cancellation: a load its own waiters abandoned is planned again.
            await asyncio.wait([task])
            if not task.cancelled():
                task.result()  # its failure is this caller's too
            return
        handle = self.fleet.present(neuron)
        while (loaded := handle.model(model)) is not None and loaded.state == ModelState.LOADING:
            await asyncio.sleep(LOAD_POLL_INTERVAL)
            await self.fleet.refresh(neuron)
            if not self.fleet.healthy(neuron):
                raise NeuronUnavailable(f"neuron {neuron} went away while loading {model!r}")
        if loaded is not None and loaded.state == ModelState.FAILED:
            raise ModelLoadFailed(f"loading {model!r} on {neuron} failed: {loaded.error}")

    def _plan_demand(self, model: str, waiting: Mapping[str, int]) -> tuple[Load, list[Action]]:
        neurons = self.catalogue.loadable_on(model)
        views = snapshot(self.fleet.reports(neurons), self.reservations)
        result = plan(
            views,
            self.catalogue.by_id(),
            self._demand(model, waiting, neurons),
            self.policy,
            self.clock(),
            estimates=self.fleet.estimates(),
            load_seconds=self.load_seconds,
        )
        load = next((a for a in result.actions if isinstance(a, Load) and a.model == model), None)
        if load is None:
            raise self._cannot_place(model, result, views)
        actions = needed_for(result.actions, load)
        self._reserve(actions)
        log.info("placing %s on %s: %s", model, load.neuron, describe(actions))
        return load, actions

    def _demand(self, model: str, waiting: Mapping[str, int], neurons: list[str]) -> list[Demand]:
        """This model's demand, and that of other waited-for models these neurons could all load:
        they compete for the same memory, and the planner serves the most waiting clients first."""
        demand = [Demand(model, max(waiting.get(model, 0), 1))]
        for other, count in sorted(waiting.items()):
            if (
                other != model
                and count > 0
                and set(neurons) <= set(self.catalogue.loadable_on(other))
            ):
                demand.append(Demand(other, count))
        return demand

    def _cannot_place(self, model: str, result: Plan, views: list[NeuronView]) -> CortexError:
        reason = result.unplaceable.get(model, "no neuron can load it")
        usable = [v for v in views if v.healthy and not v.cordoned]
        if not usable:
            failure = self.catalogue.last_failure(model)
            if failure is not None:  # the real cause, rather than a fleet that looks unhealthy
                return ModelLoadFailed(f"model {model!r} cannot be loaded: it failed on {failure}")
            if not views and any(self.fleet.healthy(name) for name in self.fleet.neurons):
                return ModelNotFound(f"model {model!r}: no neuron can load it", param="model")
            return NeuronUnavailable(
                f"model {model!r} cannot be loaded: no healthy neuron", retry_after=self.retry_after
            )
        size = self._size(model)
        memory = None
        if size is not None:
            free = [max(v.memory_free, 0) for v in usable]
            memory = Shortfall(size, max(free))
            reason += f" ({_room(free)})"
        if size is not None and size > max(v.memory_total for v in usable):
            return CapacityExhausted(f"model {model!r} cannot be loaded: {reason}", memory=memory)
        error = RoomBusy if model in result.blocked else NeuronUnavailable
        return error(
            f"model {model!r} cannot be loaded now: {reason}",
            retry_after=self.retry_after,
            memory=memory,
        )

    def _size(self, model: str) -> int | None:
        """The model's catalogue budget, else the most it was seen to take once ready."""
        spec = self.catalogue.by_id().get(model)
        return (
            spec.memory if spec is not None and spec.memory else self.fleet.estimates().get(model)
        )

    # -- by hand (the admin API, gateway/admin.py)

    def check_room(self, model: str, neuron: str) -> None:
        """FleetConflict when a load by hand of `model` on `neuron` cannot fit: it evicts nothing,
        and the neuron would only refuse it. A model of unknown size is left to the neuron."""
        handle = self.fleet.neurons.get(neuron)
        there = handle.model(model) if handle is not None else None
        if there is not None and there.state != ModelState.FAILED:
            return  # there or on its way: the load joins it
        size = self._size(model)
        views = snapshot(self.fleet.reports([neuron]), self.reservations)
        if size is None or not views or size <= views[0].memory_free:
            return
        raise FleetConflict(
            f"{model!r} needs {size / 2**20:.0f} MiB and {neuron} has "
            f"{max(views[0].memory_free, 0) / 2**20:.0f} MiB free: unload something there, or "
            "load it without a neuron (the planner evicts idle replicas for it)"
        )

    async def load_on(self, model: str, neuron: str) -> LoadedModel:
        """An operator's load of `model` on `neuron`, reserved like a planned one."""
        spec = self.catalogue.by_id().get(model)
        load = Load(model, neuron, spec.memory if spec is not None and spec.memory else 0)
        async with self._lock:
            if (neuron, model) not in self._loads:
                self._reserve([load])
        return await self._run_load(load)

    async def unload_from(self, model: str, neuron: str, *, force: bool = False) -> None:
        """An operator's unload; a refusal (busy, not loaded) is the caller's to report."""
        self._reserve([Unload(model, neuron, "evict")])  # leaving: routing stops at once
        try:
            with self.fleet.calling(self.fleet.present(neuron)) as client:
                await client.unload(model, force=force)
        finally:
            self.book.release(neuron, model)
        self.fleet.apply_unloaded(neuron, model)
        log.info("unloaded %s from %s (by hand)", model, neuron)

    # -- lifecycle

    def reconcile(self, cycle: int) -> list[Action]:
        """Plan without demand (idle unloads, pins, defrag) and start applying it in the background.

        Skipped while the previous cycle's actions are still running.
        """
        if self._reconciling is not None and not self._reconciling.done():
            return []
        if self._lock.locked():
            return []  # an on-demand placement is planning; next cycle
        result = plan(
            snapshot(self.fleet.reports(), self.reservations),
            self.catalogue.by_id(),
            [],
            self.policy,
            self.clock(),
            cycle=cycle,
            estimates=self.fleet.estimates(),
            load_seconds=self.load_seconds,
        )
        self._report_unplaceable(result)
        actions = [
            a
            for a in result.actions
            if not (isinstance(a, Load) and (a.neuron, a.model) in self._loads)
        ]
        if not actions:
            return []
        self._reserve(actions)
        log.info("lifecycle cycle %d: %s", cycle, describe(actions))
        self._reconciling = self._spawn(self._execute(actions))
        return actions

    def _report_unplaceable(self, result: Plan) -> None:
        for model, reason in result.unplaceable.items():
            if self._unplaceable.get(model) != reason:
                log.warning("cannot place %s: %s", model, reason)
        self._unplaceable = dict(result.unplaceable)

    # -- applying actions

    @property
    def reservations(self) -> Reservations:
        return self.book.current

    def _reserve(self, actions: Sequence[Action]) -> None:
        """Hold what a plan's actions take; a defrag move's unload only once it begins (`_execute`):
        until its new copy is ready, the moved replica still serves."""
        self.book.hold([a for a in actions if not is_move(a)])

    async def _execute(self, actions: Sequence[Action]) -> None:
        """Apply actions in order; a failed eviction stops the rest (their room is not there).

        Each action releases its own reservation once it ends; the ones never begun are released
        here. An unload begun goes on when the caller leaves: the neuron acts on it anyway.
        """
        remaining = list(actions)
        try:
            while remaining:
                action = remaining.pop(0)
                if isinstance(action, Load):
                    await self._run_load(action)
                    continue
                if is_move(action):
                    if self.reservations.is_leaving(action.neuron, action.model):
                        continue  # another plan's eviction took it meanwhile
                    self.book.hold([action])  # its new copy is ready: routing stops here now
                if not await asyncio.shield(self._spawn(self._unload(action))):
                    raise EvictionRefused(
                        f"could not unload {action.model!r} from {action.neuron} to make room",
                        retry_after=self.retry_after,
                    )
        finally:
            for action in remaining:
                if not is_move(action):  # held by whoever holds it, not by this plan
                    self.book.release(action.neuron, action.model)

    async def _run_load(self, load: Load) -> LoadedModel:
        key = (load.neuron, load.model)
        task = self._loads.get(key)
        if task is None or task.done():  # done: an abandoned one whose callback has yet to run
            task = asyncio.create_task(self._load(load))
            self._loads[key] = task
            task.add_done_callback(partial(self._load_done, key))
            self.book.changed()  # a placement waiting for this load to begin joins it
        return await task

    def _load_done(self, key: tuple[str, str], task: asyncio.Task[LoadedModel]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled() and task.exception() is not None:
            log.warning("load of %s on %s failed: %s", key[1], key[0], task.exception())

    async def _load(self, load: Load) -> LoadedModel:
        spec = self.catalogue.by_id().get(load.model)
        request = LoadRequest(
            model=load.model,
            source=self.catalogue.load_source(load.model, load.neuron),
            dtype=spec.dtype if spec is not None else None,
        )
        started = time.monotonic()
        try:
            handle = self.fleet.present(load.neuron)  # planned before an await
            with self.fleet.calling(handle) as client:
                loaded = await client.load(request, timeout=LOAD_READ_TIMEOUT)
            while loaded.state == ModelState.LOADING:
                await asyncio.sleep(LOAD_POLL_INTERVAL)
                await self.fleet.refresh(load.neuron)
                loaded = handle.model(load.model) or loaded.model_copy(
                    update={"state": ModelState.FAILED, "error": "vanished while loading"}
                )
            self.fleet.present(load.neuron)  # not taken out by a reload meanwhile
            if loaded.state != ModelState.READY:
                raise ModelLoadFailed(
                    f"loading {load.model!r} on {load.neuron} failed: {loaded.error}"
                )
            self.fleet.apply_loaded(load.neuron, loaded)
        except asyncio.CancelledError:
            self._spawn(self._abandon(load))
            raise
        except CortexError as err:
            if isinstance(err, CapacityExhausted) and err.memory is not None:
                self._learn(load, err.memory.needed)
            if isinstance(err, NeuronUnavailable):
                self.fleet.note_failure(load.neuron, err.message)
            else:  # the neuron answered: its status now says what failed (the model's card too)
                await self.fleet.refresh(load.neuron, fresh=True)
            raise
        finally:
            self.book.release(load.neuron, load.model)
        took = time.monotonic() - started
        self.load_seconds[load.neuron, load.model] = took
        self.metrics.load_seconds.labels(load.model, load.neuron).observe(took)
        log.info("loaded %s on %s", load.model, load.neuron)
        return loaded

    def _learn(self, load: Load, needed: int) -> None:
        """A neuron refused a load for room and said what the model needs: later plans use it."""
        if self.fleet.learn_size(load.model, needed):
            log.info("%s refused %s for room: it needs %s", load.neuron, load.model, _mib(needed))

    async def _abandon(self, load: Load) -> None:
        """Every waiter left: the neuron need not keep what nobody asked for any more."""
        handle = self.fleet.neurons.get(load.neuron)
        if handle is None:
            return  # taken out of the fleet meanwhile (a reload)
        try:
            with self.fleet.calling(handle) as client:
                await client.unload(load.model)
        except CortexError as err:
            log.info("abandoned load of %s on %s: unload said %s", load.model, load.neuron, err)
        await self.fleet.refresh(load.neuron)

    async def _unload(self, action: Unload) -> bool:
        """Unload and record it; False when the replica stays (refused, or its neuron left)."""
        try:
            return await self._call_unload(action)
        finally:
            self.book.release(action.neuron, action.model)

    async def _call_unload(self, action: Unload) -> bool:
        handle = self.fleet.neurons.get(action.neuron)
        if handle is None:  # taken out of the fleet since the plan (a reload)
            return False
        try:
            with self.fleet.calling(handle) as client:
                await client.unload(action.model)
        except ModelNotFound:
            self.fleet.apply_unloaded(action.neuron, action.model)
            return True
        except CortexError as err:
            # Typically ModelBusy: a request arrived since the snapshot. It stays; next plan decides.
            log.info("unload of %s from %s refused: %s", action.model, action.neuron, err)
            await self.fleet.refresh(action.neuron, fresh=True)  # what the next plan must see
            return False
        self.fleet.apply_unloaded(action.neuron, action.model)
        self.metrics.evictions.labels(action.model, action.neuron, action.reason).inc()
        log.info("unloaded %s from %s (%s)", action.model, action.neuron, action.reason)
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("placement stopped: %s", task.exception())
