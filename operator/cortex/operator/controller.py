"""The operator's I/O: probing neurons, running a namespace's reconcile under its lock, carrying out
the plan with NeuronClient load/unload, and reporting it as Kubernetes Events.

What this process remembers (probes, loads in flight, failed loads waiting out their backoff, the
last unload of a placement, the sizes neurons refusing a load for room said) lives here; the
decisions are made in reconcile.py and shortfall.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Literal, cast

import httpx
import kopf

from cortex.core.catalogue import readable_bytes
from cortex.core.client import DEFAULT_TIMEOUT, NeuronClient
from cortex.core.errors import CortexError, ModelNotFound
from cortex.core.fleet import LoadRequest, NeuronStatus
from cortex.core.placement.model import Action, Load, NeuronView, Unload
from cortex.core.resources import ModelPlacement, Neuron
from cortex.operator.config import OperatorConfig
from cortex.operator.metrics import OperatorMetrics, UnloadReason
from cortex.operator.neurons import Probe
from cortex.operator.planning import KeptPlan, plan_once, reuse
from cortex.operator.reconcile import (
    Fleet,
    FleetPlan,
    LoadFailure,
    PendingLoad,
    Unloaded,
    alias_refusal,
    load_failure,
    outdated_failures,
    replaced_model,
    settled_failures,
    successor,
    unanswered,
    unload_forced,
    unprobed,
)
from cortex.operator.rollout import Stale
from cortex.operator.shortfall import LearntSize, largest_home, learn, learnt_sizes

log = logging.getLogger(__name__)
SPEC_MODEL_CHANGED = "spec.model changed"  # why a replica of the model a placement left goes
REPLACED = "replaced by a replica of the edited spec"  # why a rollout's stale replica goes
Key = tuple[str, str]  # (namespace, name)
# The namespace's Neurons and ModelPlacements, as the kopf indexes hold them when called.
Objects = Callable[[], tuple[Iterable[Neuron], Iterable[ModelPlacement]]]


def body_of(obj: Neuron | ModelPlacement) -> kopf.Body:
    """The object reference kopf needs to post an Event about it."""
    raw = obj.model_dump(by_alias=True, mode="json", include={"api_version", "kind", "metadata"})
    return kopf.Body(cast(kopf.RawBody, raw))


class Controller:
    """State and effects shared by every handler of one operator process."""

    def __init__(self, config: OperatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.settings = kopf.OperatorSettings()  # the running operator's, once it starts
        # This process among kopf peers (the pod's name where it runs in one).
        self.identity = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.probes: dict[Key, Probe] = {}
        self.pending: dict[tuple[str, str, str], PendingLoad] = {}  # (namespace, model, neuron)
        # Pending loads this process unloaded: the neuron cancels them, which is no failure.
        self.cancelled: set[tuple[str, str, str]] = set()
        self.failures: dict[Key, LoadFailure] = {}  # (namespace, placement)
        self.unloaded: dict[Key, Unloaded] = {}
        self.aliases: dict[Key, str] = {}  # (namespace, spec.model) -> the id it loaded as
        self.sizes: dict[Key, LearntSize] = {}  # (namespace, placement): said by a refusal for room
        self._locks: dict[str, asyncio.Lock] = {}
        # By namespace: the plan kept while it holds, the latest plan, how many snapshots were
        # planned from, and when planning may start again.
        self._kept: dict[str, KeptPlan | None] = {}
        self._latest: dict[str, FleetPlan] = {}
        self._snapshots: dict[str, int] = {}
        self._rested: dict[str, float] = {}
        self._clients: dict[tuple[str, bool], NeuronClient] = {}
        self._tls: ssl.SSLContext | None = None  # one for every client: each costs a CA bundle read
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = OperatorMetrics(pending=self.pending, backing_off=self.backing_off)

    def backing_off(self) -> int:
        """Placements waiting out the backoff of a failed load now."""
        now = self.clock()
        return sum(1 for failure in self.failures.values() if failure.retry_at > now)

    def client(self, endpoint: str, *, probing: bool = False) -> NeuronClient:
        """One client per neuron; probes get a short timeout, loads the long default."""
        key = (endpoint, probing)
        if key not in self._clients:
            quick = httpx.Timeout(max(min(self.config.probe_interval * 2, 10.0), 1.0))
            timeout = quick if probing else DEFAULT_TIMEOUT
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            self._clients[key] = NeuronClient(
                endpoint, admin_token=self.config.admin_token, timeout=timeout, tls=self._tls
            )
        return self._clients[key]

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await asyncio.to_thread(self.metrics.close)  # waits out its serving thread

    # -- probing

    async def probe(self, namespace: str, neuron: Neuron) -> Probe | None:
        """Ask the neuron for its /status; a failed probe keeps the last answer until the neuron
        has failed `unreachable_after` probes in a row."""
        endpoint = neuron.spec.endpoint
        key = (namespace, neuron.metadata.name)
        if not endpoint:
            self.probes.pop(key, None)  # an endpoint taken away: what it said no longer holds
            return None
        now = self.clock()  # when it was asked: of two probes in flight, the later question wins
        answer: NeuronStatus | None = None
        error: str | None = None
        try:
            answer = await self.client(endpoint, probing=True).status()
        except (CortexError, httpx.HTTPError, ValueError) as exc:
            error = _reason(exc)
        self.metrics.probes.labels("ok" if error is None else "failed").inc()
        before = self.probes.get(key)
        if before is not None and before.at > now:
            # Asked after this one and answered first (a probe after a load, say, overtaking the
            # timer's): this answer is older and would bring back a replica still loading.
            return before
        if answer is not None:
            if before is not None and before.status == answer:
                answer = before.status  # the same object: the plan's key compares it by identity
            probe = Probe(endpoint, now, status=answer)
        else:
            same = before is not None and before.endpoint == endpoint
            failures = before.failures + 1 if same and before is not None else 1
            last = before.status if same and before is not None else None
            probe = Probe(endpoint, now, status=last, error=error, failures=failures)
        self.probes[key] = probe
        return probe

    # -- reconcile

    def fleet(
        self, namespace: str, neurons: Iterable[Neuron], placements: Iterable[ModelPlacement]
    ) -> Fleet:
        """The namespace's snapshot: its objects, their probes and what this process remembers
        (but the failures of specs since edited: those no longer hold)."""
        live = tuple(p for p in placements if not p.metadata.deletion_timestamp)
        failures = {name: f for (ns, name), f in self.failures.items() if ns == namespace}
        for name in outdated_failures(failures, live):
            del failures[name]
        sizes = {name: s for (ns, name), s in self.sizes.items() if ns == namespace}
        return Fleet(
            neurons=tuple(neurons),
            probes={name: p for (ns, name), p in self.probes.items() if ns == namespace},
            placements=live,
            pending={(m, n): p for (ns, m, n), p in self.pending.items() if ns == namespace},
            failures=failures,
            unloaded={name: u for (ns, name), u in self.unloaded.items() if ns == namespace},
            sizes=learnt_sizes(sizes, live) if sizes else {},
            aliases={m: c for (ns, m), c in self.aliases.items() if ns == namespace},
            unreachable_after=self.config.unreachable_after,
        )

    async def reconcile(self, namespace: str, objects: Objects) -> tuple[Fleet, FleetPlan] | None:
        """The namespace's plan for the fleet as `objects` give it now, carried out when it is
        new; None while neurons are unprobed. A plan is made once per change (planning.py) and
        one at a time: a reconcile that finds the fleet changed waits for the next plan, whose
        snapshot is taken after it looked, and so does every reconcile queued meanwhile."""
        fleet = self.fleet(namespace, *objects())
        if unprobed(fleet):
            return None
        kept = reuse(self._kept.get(namespace), fleet, self.clock())
        if kept is not None:
            self._kept[namespace] = kept
            return fleet, kept.planned
        seen = self._snapshots.get(namespace, 0)
        async with self._locks.setdefault(namespace, asyncio.Lock()):
            latest = self._latest.get(namespace)
            if latest is not None and self._snapshots[namespace] > seen:
                return self.fleet(namespace, *objects()), latest  # planned after we looked
            # Plan at most half the time: the loop has watch events, patches and loads to serve.
            await asyncio.sleep(max(self._rested.get(namespace, 0.0) - time.monotonic(), 0.0))
            return await self._plan(namespace, objects)

    async def _plan(self, namespace: str, objects: Objects) -> tuple[Fleet, FleetPlan] | None:
        """Plan from a fresh snapshot (under the namespace's lock) and carry the plan out."""
        indexed_neurons, indexed_placements = objects()
        neurons, placements = list(indexed_neurons), list(indexed_placements)
        mine = {name: f for (ns, name), f in self.failures.items() if ns == namespace}
        for name in outdated_failures(mine, placements):
            self.failures.pop((namespace, name), None)  # an edited spec: its attempts start again
        sizes = {name: s for (ns, name), s in self.sizes.items() if ns == namespace}
        for name in sizes.keys() - learnt_sizes(sizes, placements).keys():
            del self.sizes[(namespace, name)]  # a new source or new resources: said afresh
        fleet = self.fleet(namespace, neurons, placements)
        if unprobed(fleet):
            return None
        started = time.monotonic()
        planned, self._kept[namespace] = plan_once(self._kept.get(namespace), fleet, self.clock())
        for name in settled_failures(fleet, planned, self.clock()):
            self.failures.pop((namespace, name), None)
        self._latest[namespace] = planned
        self._snapshots[namespace] = self._snapshots.get(namespace, 0) + 1
        ended = time.monotonic()
        self.metrics.plan_seconds.observe(ended - started)
        self._rested[namespace] = ended + (ended - started)
        if planned.steps:
            await self._execute(namespace, fleet, planned)
            fleet = self.fleet(namespace, neurons, placements)
        return fleet, planned

    async def _execute(self, namespace: str, fleet: Fleet, planned: FleetPlan) -> None:
        owners = fleet.owners
        left = {replaced_model(p): p for p in fleet.placements if replaced_model(p)}
        neurons = {n.metadata.name: n for n in fleet.neurons}
        refused: set[str] = set()  # neurons where an unload failed: the loads after it would too
        touched: set[str] = set()
        for action in planned.steps:
            neuron = neurons[action.neuron]
            if isinstance(action, Unload):
                touched.add(action.neuron)
                why = _unload_why(action, planned)
                # None: a model no placement owns
                placement = owners.get(action.model) or left.get(action.model)
                if placement is not None:
                    self._say_replacing(placement, action, planned)
                if not await self._unload(namespace, placement, neuron, action, why):
                    refused.add(action.neuron)
            elif action.neuron not in refused:
                self._say_replacing(owners[action.model], action, planned)
                self._start_load(
                    namespace, owners[action.model], neuron, action, fleet, planned.views
                )
        for name in sorted(touched):
            await self.probe(namespace, neurons[name])

    def _say_replacing(self, placement: ModelPlacement, action: Action, planned: FleetPlan) -> None:
        """The Replacing Event of a rollout step: a replacement loaded beside a stale replica, or
        a stale replica replaced in place for want of room (said once, on its unload)."""
        stale = replacing(planned, action)
        in_place = any(
            isinstance(a, Load) and (a.model, a.neuron) == (action.model, action.neuron)
            for a in planned.rolling
        )
        if stale is None or (isinstance(action, Load) and in_place):
            return  # not a rollout's, or the in-place load: said with its unload
        if isinstance(action, Load):
            message = f"loading its replacement on {action.neuron} first"
        elif in_place:
            message = (
                "no room for a replacement beside it: replaced in place (unloaded, then loaded)"
            )
        else:
            return  # a stale replica going once its replacement is ready: Event Unloaded
        message = f"{action.model} on {stale.neuron}: {stale.why}; {message}"
        kopf.info(body_of(placement), reason="Replacing", message=message)

    async def _unload(
        self,
        namespace: str,
        placement: ModelPlacement | None,
        neuron: Neuron,
        action: Unload,
        why: str | None = None,
    ) -> bool:
        """Unload one replica and say so on its placement (or, unowned, on its neuron)."""
        subject = body_of(placement if placement is not None else neuron)
        kind: UnloadReason = "idle" if action.reason == "idle" else "evict"
        if why is not None:
            replaced = why == SPEC_MODEL_CHANGED or why.startswith(REPLACED)
            kind = "replaced" if replaced else "excess"
        self._cancel_pending(namespace, action.model, neuron.metadata.name)
        try:
            await self.client(neuron.spec.endpoint or "").unload(action.model)
        except ModelNotFound:
            self.metrics.unloads.labels(kind, "ok").inc()  # gone already: what it wanted
            return True
        except CortexError as exc:
            self.metrics.unloads.labels(kind, "failed").inc()
            message = f"{action.model} on {neuron.metadata.name}: {exc}"
            kopf.warn(subject, reason="UnloadFailed", message=message)
            return False
        self.metrics.unloads.labels(kind, "ok").inc()
        reason: Literal["Evicted", "Idle"] = "Idle" if action.reason == "idle" else "Evicted"
        default = (
            "unused for longer than its idleTimeout"
            if reason == "Idle"
            else "evicted to make room for a higher-priority or waiting model"
        )
        message = f"{action.model} unloaded from {neuron.metadata.name}: {why or default}"
        if placement is not None and why is None:
            record = Unloaded(neuron.metadata.name, reason, message, self.clock())
            self.unloaded[(namespace, placement.metadata.name)] = record
        kopf.info(subject, reason="Unloaded" if why else reason, message=message)
        return True

    def _cancel_pending(self, namespace: str, model: str, neuron: str) -> None:
        """An unload about to be sent ends the load in flight there, if any: not a failure."""
        if (namespace, model, neuron) in self.pending:
            self.cancelled.add((namespace, model, neuron))

    def _start_load(
        self,
        namespace: str,
        placement: ModelPlacement,
        neuron: Neuron,
        action: Load,
        fleet: Fleet,
        views: tuple[NeuronView, ...],
    ) -> None:
        key = (namespace, action.model, action.neuron)
        if key in self.pending:
            return
        self.pending[key] = PendingLoad(action.model, action.neuron, action.memory, self.clock())
        request = LoadRequest(
            model=action.model,
            source=placement.spec.source,
            devices=_devices(fleet.probes.get(action.neuron), placement.spec.resources.devices),
        )
        kopf.info(
            body_of(placement),
            reason="Loading",
            message=f"loading {action.model} on {action.neuron}",
        )
        largest = largest_home(views, placement)
        self.spawn(self._load(namespace, placement, neuron, request, action.memory, largest))

    def spawn(self, work: Coroutine[object, object, None]) -> None:
        """Run `work` in the background until it ends or the operator closes."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(
        self,
        namespace: str,
        placement: ModelPlacement,
        neuron: Neuron,
        request: LoadRequest,
        planned: int = 0,
        largest: int = 0,
    ) -> None:
        """One load, awaited in the background (`planned`: bytes the plan gave it; `largest`: the
        most one neuron it may use holds); a failure starts (or lengthens) the backoff, but for a
        refusal for room that says a larger size: that one is planned again at once with it."""
        name, where = placement.metadata.name, neuron.metadata.name
        try:
            limit = self.config.load_timeout
            client = self.client(neuron.spec.endpoint or "")
            loaded = await asyncio.wait_for(client.load(request, timeout=limit), limit)
        except (CortexError, httpx.HTTPError, TimeoutError) as exc:
            if (namespace, request.model, where) in self.cancelled:
                log.info("load of %s on %s cancelled by an unload", request.model, where)
                return
            self.metrics.loads.labels("failed").inc()
            needed = self._learn(namespace, placement, exc)
            failure = load_failure(
                self.failures.get((namespace, name)),
                where,
                _reason(exc),
                placement.metadata.generation,
                self.clock(),
                self.config.backoff,
                # As the gateway's placer: planned again when the refusal said more than the
                # plan gave the load (a size unknown to it, or too small).
                learnt=needed is not None and needed > planned,
            )
            self.failures[(namespace, name)] = failure
            _say_failed(placement, failure, needed, largest)
        else:
            self.metrics.loads.labels("ok").inc()
            self.failures.pop((namespace, name), None)
            if loaded.id != request.model:
                # The neuron resolved an alias and reports the replica under its own id.
                self.aliases[(namespace, request.model)] = loaded.id
                message = alias_refusal(request.model, loaded.id)
                kopf.warn(body_of(placement), reason="Unschedulable", message=message)
            else:
                kopf.info(
                    body_of(placement), reason="Loaded", message=f"{request.model} ready on {where}"
                )
        finally:
            with contextlib.suppress(Exception):
                await self.probe(namespace, neuron)
            self.pending.pop((namespace, request.model, where), None)
            self.cancelled.discard((namespace, request.model, where))

    def _learn(self, namespace: str, placement: ModelPlacement, exc: BaseException) -> int | None:
        """The size a refusal for room said (None: not one), remembered when it is more than
        was known."""
        shortfall = exc.memory if isinstance(exc, CortexError) else None
        if shortfall is None:
            return None
        key = (namespace, placement.metadata.name)
        learnt = learn(self.sizes.get(key), placement, shortfall.needed)
        if learnt is not None:
            self.sizes[key] = learnt
        return shortfall.needed

    # -- deletion

    async def unload_everywhere(
        self,
        namespace: str,
        placement: ModelPlacement,
        neurons: list[Neuron],
        placements: list[ModelPlacement],
    ) -> list[str]:
        """Unload the placement's model from every neuron holding or loading it (the neuron's
        unload cancels a load), unless another placement still places it; what holds the deletion
        (neurons still busy, a load whose call has not ended yet)."""
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        model, busy = placement.spec.model, []
        async with lock:
            heir = successor(placement, placements)
            if heir is not None:
                log.info("%s stays loaded: ModelPlacement %s places it too", model, heir)
            elif waiting := unanswered(self.fleet(namespace, neurons, [])):
                # A restarted operator knows nothing of what they hold until they answer.
                return [f"{name} (not probed yet)" for name in waiting]
            else:
                busy = await self._unload_held(namespace, placement, neurons)
                if any(ns == namespace and m == model for ns, m, _ in self.pending):
                    busy.append("a load still in flight, cancelled")
            self.failures.pop((namespace, placement.metadata.name), None)
            self.unloaded.pop((namespace, placement.metadata.name), None)
            self.sizes.pop((namespace, placement.metadata.name), None)
        return busy

    async def _unload_held(
        self, namespace: str, placement: ModelPlacement, neurons: list[Neuron]
    ) -> list[str]:
        """Unload a deleted placement's model (busy or not, after the grace); the neurons still
        busy with it. An unreachable neuron is skipped: waiting for it would hold the deletion."""
        model, busy = placement.spec.model, []
        force = unload_forced(placement, self.clock())
        for neuron in self._holding(namespace, neurons, model):
            self._cancel_pending(namespace, model, neuron.metadata.name)
            try:
                await self.client(neuron.spec.endpoint or "").unload(model, force=force)
            except ModelNotFound:
                pass
            except CortexError as exc:
                self.metrics.unloads.labels("delete", "failed").inc()
                busy.append(f"{neuron.metadata.name} ({exc})")
                continue
            self.metrics.unloads.labels("delete", "ok").inc()
            message = f"unloaded from {neuron.metadata.name}: placement deleted"
            kopf.info(body_of(placement), reason="Unloaded", message=message)
            await self.probe(namespace, neuron)
        return busy

    def _holding(self, namespace: str, neurons: list[Neuron], model: str) -> list[Neuron]:
        """Reachable neurons whose last answer lists the model, or that this process asked to
        load it."""
        holding = []
        for neuron in neurons:
            probe = self.probes.get((namespace, neuron.metadata.name))
            if probe is None or probe.status is None or not neuron.spec.endpoint:
                continue
            if (namespace, model, neuron.metadata.name) in self.pending:
                holding.append(neuron)
                continue
            if probe.reachable(self.config.unreachable_after) and any(
                m.id == model for m in probe.status.models
            ):
                holding.append(neuron)
        return holding


def _say_failed(
    placement: ModelPlacement, failure: LoadFailure, needed: int | None, largest: int
) -> None:
    """The Event of a failed load: a size learnt from a refusal for room is planned with at once
    (Normal `NoRoom`), or is more than any neuron holds (Warning `Unschedulable`); any other
    failure is backed off (Warning `LoadFailed`)."""
    where, reason = failure.neuron, failure.reason
    if needed is not None and 0 < largest < needed:
        message = (
            f"{where} refused it for room: it needs {readable_bytes(needed)}, more than any neuron it"
            f" may use holds (largest {readable_bytes(largest)})"
        )
        kopf.warn(body_of(placement), reason="Unschedulable", message=message)
    elif failure.room and needed is not None:
        message = f"{where}: {reason}; planning again for the {readable_bytes(needed)} it needs"
        kopf.info(body_of(placement), reason="NoRoom", message=message)
    else:
        wait = failure.retry_at - failure.at
        message = f"{where}: {reason}; next try in {wait:.0f}s"
        kopf.warn(body_of(placement), reason="LoadFailed", message=message)


def _unload_why(action: Unload, planned: FleetPlan) -> str | None:
    """Why the operator itself unloads a replica; None for the planner's evictions."""
    if action in planned.replaced:
        return SPEC_MODEL_CHANGED
    if action in planned.rolling:
        stale = replacing(planned, action)
        return f"{REPLACED} ({stale.why})" if stale is not None else REPLACED
    return "above replicas.max" if action in planned.excess else None


def replacing(planned: FleetPlan, action: Action) -> Stale | None:
    """The stale replica an action of a rollout replaces: for an unload, the one it unloads; for a
    load, the first stale replica of its model (a replacement stands in for any of them)."""
    found = [s for s in planned.stale if s.model == action.model]
    if isinstance(action, Unload):
        return next((s for s in found if s.neuron == action.neuron), None)
    return found[0] if found else None


def _devices(probe: Probe | None, count: int) -> list[str] | None:
    """A multi-device replica goes on the healthy devices with the most free memory; a
    single-device one lets the neuron choose."""
    if count <= 1 or probe is None or probe.status is None:
        return None
    devices = sorted(
        (d for d in probe.status.devices if d.healthy), key=lambda d: (-d.memory_free, d.id)
    )
    return [d.id for d in devices[:count]] if len(devices) >= count else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CortexError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "no answer before the load timeout"
    return f"{type(exc).__name__}: {exc}"
