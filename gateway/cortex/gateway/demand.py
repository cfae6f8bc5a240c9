"""Cold start on Kubernetes (docs/kubernetes.md, "The gateway on Kubernetes"): a request for a
model with no Ready replica records demand on the model's ModelPlacement (the
`cortex.helexa.ai/demand` annotation the operator loads a replica for) and waits until the watch
shows a Ready replica, at most the load timeout; then 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from cortex.core.errors import NeuronUnavailable
from cortex.core.kube_api import KubeApiError
from cortex.core.resources import ModelPlacement, PlacementDemand, rfc3339
from cortex.gateway.kube_fleet import PLACEMENT_RESOURCE, KubeFleet

log = logging.getLogger(__name__)


class DemandSignal:
    """A `ColdStart` that asks the operator. Demand is patched at most once per placement per
    `interval` however many requests wait, and again each `interval` while they still wait."""

    def __init__(
        self,
        kube: KubeFleet,
        *,
        timeout: float,
        retry_after: float = 5.0,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.timeout, self.retry_after, self.interval = timeout, retry_after, interval
        self.clock, self.wall = clock, wall
        self._waiting: Counter[str] = Counter()
        self._patched: dict[str, float] = {}  # placement -> when this gateway last patched it
        self._patches: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Stop demand patches still on their way (the API client is about to close)."""
        for task in self._patches:
            task.cancel()
        await asyncio.gather(*self._patches, return_exceptions=True)

    def waiting(self, model: str) -> int:
        return self._waiting[model]

    async def ensure(self, model: str, timeout: float | None = None) -> str:
        wait = self.timeout if timeout is None else timeout
        deadline = self.clock() + max(wait, 0.0)
        self._waiting[model] += 1
        try:
            while True:
                change = self.kube.next_change()  # taken before looking: no change slips by
                ready = self.kube.ready(model)
                if ready:
                    return ready[0]
                self._signal(model)
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise NeuronUnavailable(
                        f"model {model!r} has no ready replica yet (asked the operator for one); "
                        "retry shortly",
                        retry_after=self.retry_after,
                    )
                # Woken by any change, and each interval to renew the demand while still waiting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.wait(), min(remaining, self.interval))
        finally:
            self._waiting[model] -= 1
            if self._waiting[model] <= 0:
                del self._waiting[model]

    def _signal(self, model: str) -> None:
        """Patch the demand onto the model's placements that have no Ready replica, unless this
        gateway (or, by the annotation's time, another replica of it) did within `interval`."""
        now = self.clock()
        for placement in self.kube.placements_of(model):
            name = placement.metadata.name
            if (
                _has_ready(placement)
                or now - self._patched.get(name, -self.interval) < self.interval
            ):
                continue
            recorded = PlacementDemand.from_annotations(placement.metadata.annotations)
            if recorded is not None and self.wall() - recorded.at_seconds < self.interval:
                continue
            self._patched[name] = now
            demand = PlacementDemand(at=rfc3339(self.wall()), waiting=self._waiting[model])
            task = asyncio.create_task(self._patch(name, demand))
            self._patches.add(task)
            task.add_done_callback(self._patches.discard)

    async def _patch(self, name: str, demand: PlacementDemand) -> None:
        patch = {"metadata": {"annotations": demand.annotation()}}
        try:
            await self.kube.api.merge_patch(PLACEMENT_RESOURCE, self.kube.namespace, name, patch)
        except KubeApiError as err:
            log.warning("could not record demand on ModelPlacement %s: %s", name, err)
            return
        log.info("demand recorded on ModelPlacement %s (%d waiting)", name, demand.waiting)


def _has_ready(placement: ModelPlacement) -> bool:
    status = placement.status
    return status is not None and any(r.state == "ready" for r in status.replicas)
