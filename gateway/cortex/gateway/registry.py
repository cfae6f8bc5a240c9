"""The gateway's view of its neurons: polled status and listings, health, live request counts.

What the gateway itself is loading or unloading is not kept here: the placer owns those
reservations (placer.py), and joins them with these polls through `cortex.core.placement.snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from cortex.core.client import DEFAULT_TIMEOUT, NeuronClient
from cortex.core.config import NeuronEntry
from cortex.core.errors import CortexError, NeuronUnavailable, NeuronUnreachable
from cortex.core.fleet import LoadedModel, ModelListing, ModelState, NeuronStatus
from cortex.core.placement.model import Usage
from cortex.core.placement.snapshot import NeuronReport
from cortex.gateway.pulse import Pulse

log = logging.getLogger(__name__)

# No pool wait of ours may pass for a neuron's fault: the connections to a neuron are bounded by
# the requests this gateway admits for it (`Fleet.full`, from the neuron's admission limits).
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)
# A poll's answer takes milliseconds; one that has not come in this long is from a host that
# died without closing its connections (power loss), and would hold every later poll up.
POLL_TIMEOUT = 10.0


@dataclass
class NeuronHandle:
    """One neuron: its client, what its last polls said, and what this gateway sends it now."""

    entry: NeuronEntry
    client: NeuronClient
    status: NeuronStatus | None = None
    listing: ModelListing | None = None
    failures: int = 0
    # Counts every failure noted: a poll answered after a failure it began before does not
    # clear that failure.
    setbacks: int = 0
    last_seen: float | None = None
    last_error: str | None = None
    cordoned: bool = False
    # Counted here, not polled: routing needs the load of this very moment.
    in_flight: Counter[str] = field(default_factory=Counter)
    last_used: dict[str, float] = field(default_factory=dict)
    # When this gateway's last request on each model ended, and when the poll behind `status`
    # was sent: a poll sent before a request ended counted it (snapshot.py ignores that count).
    finished: dict[str, float] = field(default_factory=dict)
    asked_at: float | None = None
    # Bumped by every local change (a load's or unload's answer): a poll that was already on
    # its way when one happened carries older news and must not overwrite it.
    generation: int = 0
    # Taken out of the fleet (Fleet.retire): no new requests; gone once those running end.
    leaving: bool = False
    calls: int = 0  # polls, loads and unloads on their way (Fleet.calling)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def busy(self) -> bool:
        return self.calls > 0 or any(count > 0 for count in self.in_flight.values())

    def model(self, model: str) -> LoadedModel | None:
        if self.status is None:
            return None
        return next((m for m in self.status.models if m.id == model), None)


class Fleet:
    """Registry of neurons, refreshed by polling; health after consecutive failures."""

    def __init__(
        self,
        entries: Iterable[NeuronEntry],
        *,
        unhealthy_after: int = 3,
        admin_token: str | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.unhealthy_after = unhealthy_after
        self._admin_token = admin_token
        # Requests per model through this gateway, decayed: the `cost` eviction strategy's rate.
        self.usage: dict[str, Usage] = {}
        # The most memory each model was seen to take once ready, anywhere, or a neuron said it
        # needs when it refused it for room: kept after its last replica goes, so a later cold
        # load of it is planned with its size, not on a guess.
        self.sizes: dict[str, int] = {}
        # Beats when a replica goes idle and when a poll or a load's or unload's answer is
        # recorded: a placement waiting for room plans again then (placer.py).
        self.changes = Pulse()
        self._timeout = DEFAULT_TIMEOUT
        if request_timeout is not None:
            # Bounds each read: a neuron silent for this long mid-answer is given up on.
            self._timeout = httpx.Timeout(
                connect=DEFAULT_TIMEOUT.connect,
                read=request_timeout,
                write=DEFAULT_TIMEOUT.write,
                pool=DEFAULT_TIMEOUT.pool,
            )
        self.neurons: dict[str, NeuronHandle] = {}
        # Handles replaced or retired while requests still ran on them; closed once drained.
        self._retired: list[NeuronHandle] = []
        self._closing: set[asyncio.Task[None]] = set()
        for entry in entries:
            self.add(entry)

    def add(self, entry: NeuronEntry, client: NeuronClient | None = None) -> NeuronHandle:
        """Register a neuron (a later entry of the same name replaces the earlier one)."""
        token = entry.admin_token or self._admin_token
        client = client or NeuronClient(
            entry.endpoint,
            admin_token=token,
            timeout=self._timeout,
            name=entry.name,
            limits=POOL_LIMITS,
        )
        handle = NeuronHandle(entry, client)
        self.neurons[entry.name] = handle
        return handle

    def replace(self, entry: NeuronEntry) -> NeuronHandle:
        """A new handle for a neuron whose endpoint or token changed (or a new one). Requests
        running on the old handle keep their counts; its client is closed once they end. Until
        its first poll the new handle is taken to hold what the old one last showed."""
        old = self.neurons.get(entry.name)
        handle = self.add(entry)
        if old is not None:
            handle.in_flight, handle.last_used = old.in_flight, old.last_used
            handle.finished = old.finished
            if not old.leaving:
                handle.status, handle.listing = old.status, old.listing
                handle.asked_at = old.asked_at
                handle.failures, handle.last_error = old.failures, old.last_error
                handle.cordoned = old.cordoned
            self._retired.append(old)
            self._close_drained()
        return handle

    def retire(self, name: str) -> None:
        """Take a neuron out of the fleet: from now on it is neither routed to nor polled, nor
        a place for loads; it leaves the registry, its client closed, once its requests end."""
        handle = self.neurons.get(name)
        if handle is not None:
            handle.leaving, handle.status = True, None
            # What /health, /fleet and the fleet page say while its last requests finish.
            handle.last_error = "taken out of the fleet: leaves once its running requests end"
            self._close_drained()

    def _close_drained(self) -> None:
        for name, handle in list(self.neurons.items()):
            if handle.leaving and not handle.busy:
                del self.neurons[name]
                self._retired.append(handle)
        drained = [h for h in self._retired if not h.busy]
        self._retired = [h for h in self._retired if h.busy]
        for handle in drained:
            task = asyncio.get_running_loop().create_task(handle.client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @contextmanager
    def calling(self, handle: NeuronHandle) -> Iterator[NeuronClient]:
        """The handle's client for a call that is not a request (a poll, a load, an unload): a
        replaced or retired handle's client stays open until such calls end too."""
        handle.calls += 1
        try:
            yield handle.client
        finally:
            handle.calls -= 1
            if handle.leaving or self._retired:
                self._close_drained()

    def __getitem__(self, name: str) -> NeuronHandle:
        return self.neurons[name]

    def members(self) -> dict[str, NeuronHandle]:
        """The neurons in the fleet, without those taken out whose last requests still run."""
        return {name: handle for name, handle in self.neurons.items() if not handle.leaving}

    def present(self, name: str) -> NeuronHandle:
        """The handle of a neuron named before an await: a reload may have taken it out since."""
        handle = self.members().get(name)
        if handle is None:
            raise NeuronUnavailable(f"neuron {name} has left the fleet")
        return handle

    async def aclose(self) -> None:
        clients = [h.client for h in [*self.neurons.values(), *self._retired]]
        await asyncio.gather(
            *self._closing, *(client.aclose() for client in clients), return_exceptions=True
        )

    # -- polling

    async def poll(self) -> None:
        """Refresh every neuron at once; one slow neuron does not delay the others' news."""
        await asyncio.gather(*(self.refresh(name) for name in self.members()))

    async def refresh(self, name: str, *, fresh: bool = False) -> None:
        """Read the neuron's status and listing. `fresh`: after a change this gateway caused (a
        failed load), so a poll begun before it cannot put the older picture back."""
        handle = self.neurons.get(name)
        if handle is None or handle.leaving:
            return  # taken out of the fleet meanwhile
        if fresh:
            handle.generation += 1
        generation, setbacks = handle.generation, handle.setbacks
        asked_at = time.time()
        try:
            with self.calling(handle) as client:
                status, listing = await asyncio.wait_for(
                    asyncio.gather(client.status(), client.models()), POLL_TIMEOUT
                )
        except TimeoutError:
            if not handle.leaving:
                self._suspect(handle, f"no answer to a poll in {POLL_TIMEOUT:g} s")
            return
        except NeuronUnreachable as exc:
            if not handle.leaving:
                self._suspect(handle, exc.message)
            return
        except (CortexError, ValueError) as exc:
            if not handle.leaving:
                self._failed(handle, str(exc))
            return
        if handle.leaving:
            return  # taken out while the poll was on its way: its news change nothing
        handle.last_seen = time.time()
        if handle.setbacks == setbacks:
            handle.failures, handle.last_error = 0, None
        self._measure(status.models)
        if handle.generation != generation:
            return  # overtaken by a local change; the next poll brings the newer picture
        handle.status, handle.listing, handle.asked_at = status, listing, asked_at
        self.changes.beat()

    def note_failure(self, name: str, error: str) -> None:
        """A failed poll or request; after `unhealthy_after` in a row the neuron is skipped."""
        handle = self.neurons.get(name)
        if handle is not None:
            self._failed(handle, error)

    def mark_suspect(self, name: str, error: str) -> None:
        """A connection failure: skip the neuron now, until a poll finds it answering again."""
        handle = self.neurons.get(name)
        if handle is not None:
            self._suspect(handle, error)

    # A poll's failure is its handle's: one replaced meanwhile (a new address) keeps it.

    def _failed(self, handle: NeuronHandle, error: str) -> None:
        handle.failures += 1
        handle.setbacks += 1
        handle.last_error = error
        if handle.failures == self.unhealthy_after:
            log.warning(
                "neuron %s unhealthy after %d failures: %s", handle.name, handle.failures, error
            )

    def _suspect(self, handle: NeuronHandle, error: str) -> None:
        if handle.failures < self.unhealthy_after:
            log.warning("neuron %s suspect: %s", handle.name, error)
        handle.failures = max(handle.failures + 1, self.unhealthy_after)
        handle.setbacks += 1
        handle.last_error = error

    def full(self, name: str, model: str) -> bool:
        """Whether this gateway already sends the model on this neuron the most its admission
        ever holds; past that the neuron could only refuse. That most is `max_running` plus twice
        `max_queue`: a principal with nothing queued is let in past a queue full of others'
        requests (docs/architecture.md, "Fairness"), and only the neuron knows whose they are,
        so below it the neuron decides, fairly, whom to refuse."""
        status = self.neurons[name].status
        if status is None or status.max_running is None or status.max_queue is None:
            return False
        most = status.max_running + 2 * status.max_queue
        return self.neurons[name].in_flight[model] >= most

    def healthy(self, name: str) -> bool:
        handle = self.neurons.get(name)
        return (
            handle is not None
            and not handle.leaving
            and handle.status is not None
            and handle.status.healthy
            and handle.failures < self.unhealthy_after
        )

    # -- replicas

    def polled(self, model: str, state: ModelState) -> list[str]:
        """Healthy neurons whose last poll shows the model in `state` (a cordon stops loads, not
        requests). Routing asks the placer, which also knows what it is taking away."""
        names = []
        for name, handle in self.neurons.items():
            loaded = handle.model(model)
            if loaded is not None and loaded.state == state and self.healthy(name):
                names.append(name)
        return names

    def begin(self, name: str, model: str) -> None:
        handle = self.neurons[name]
        handle.in_flight[model] += 1
        now = time.time()
        handle.last_used[model] = now
        self.usage[model] = self.usage.get(model, Usage()).add(now)

    def end(self, name: str, model: str) -> None:
        handle = self.neurons[name]
        handle.in_flight[model] -= 1
        handle.last_used[model] = handle.finished[model] = time.time()
        if handle.in_flight[model] <= 0:
            del handle.in_flight[model]
            self.changes.beat()
            if handle.leaving or self._retired:
                self._close_drained()

    def apply_loaded(self, name: str, loaded: LoadedModel) -> None:
        """Record a load's answer now rather than at the next poll, its memory no longer free."""
        handle = self.neurons.get(name)
        if handle is None:
            return  # taken out of the fleet meanwhile
        handle.generation += 1
        self._measure([loaded])
        if handle.status is not None:
            before = handle.model(loaded.id)  # a poll during the load may have counted some
            _charge(
                handle.status, loaded, loaded.memory_bytes - (before.memory_bytes if before else 0)
            )
            others = [m for m in handle.status.models if m.id != loaded.id]
            handle.status.models = [*others, loaded]
        self.changes.beat()

    def apply_unloaded(self, name: str, model: str) -> None:
        """Record an unload now rather than at the next poll, its memory free again."""
        handle = self.neurons.get(name)
        if handle is None:
            return  # taken out of the fleet meanwhile
        handle.generation += 1
        gone = handle.model(model)
        if handle.status is not None and gone is not None:
            _charge(handle.status, gone, -gone.memory_bytes)
            handle.status.models = [m for m in handle.status.models if m.id != model]
        self.changes.beat()

    def _measure(self, models: Iterable[LoadedModel]) -> None:
        """Keep the largest size seen of each ready model; a failed record's is only the neuron's
        guess before it loaded anything."""
        for loaded in models:
            if loaded.state == ModelState.READY and loaded.memory_bytes > 0:
                self.sizes[loaded.id] = max(self.sizes.get(loaded.id, 0), loaded.memory_bytes)

    def learn_size(self, model: str, at_least: int) -> bool:
        """A neuron refused `model` for room, saying it needs `at_least` bytes (its estimate from
        the weights' files, a lower bound of what it takes once ready); True when that is more
        than was known."""
        if at_least <= self.sizes.get(model, 0):
            return False
        self.sizes[model] = at_least
        return True

    def estimates(self) -> dict[str, int]:
        """Bytes a model was seen to use once ready, anywhere, now or before: the planner's size
        for models without a budget."""
        return dict(self.sizes)

    # -- the planner's snapshot

    def reports(self, names: Iterable[str] | None = None) -> list[NeuronReport]:
        """What the last polls and this gateway's own requests say of the named neurons (all by
        default), as `cortex.core.placement.snapshot` reads them."""
        chosen = self.neurons if names is None else {n: self.neurons[n] for n in names}
        return [
            NeuronReport(
                name=handle.name,
                status=handle.status,
                healthy=self.healthy(handle.name),
                cordoned=handle.cordoned,
                labels=handle.entry.labels,
                in_flight=handle.in_flight,
                last_used=handle.last_used,
                usage=self.usage,
                asked_at=handle.asked_at,
                finished=handle.finished,
            )
            for handle in chosen.values()
        ]


def _charge(status: NeuronStatus, model: LoadedModel, used: int) -> None:
    """Count `used` more bytes taken on the model's devices (all when it names none): until the
    next poll, the planner must not see the memory a load took as free, nor an unload's as taken."""
    devices = [d for d in status.devices if d.id in model.devices] or status.devices
    if not devices:
        return
    share, rest = divmod(used, len(devices))
    for index, device in enumerate(devices):
        taken = share + (rest if index == 0 else 0)
        device.memory_free -= taken
        device.memory_used += taken
