"""The gateway's parts wired together: fleet, catalogue, placement, dispatch, auth and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from cortex.core.catalogue import ModelSpec, merge_catalogues
from cortex.core.config import GatewayConfig, NeuronEntry
from cortex.core.errors import CortexError
from cortex.core.placement.model import Policy
from cortex.core.shutdown import Drain
from cortex.gateway.auth import Authenticator, Principal
from cortex.gateway.call import Accounting, Call, Surface
from cortex.gateway.catalogue import FleetModelCard, LiveCatalogue
from cortex.gateway.dispatch import Dispatcher, Upstream
from cortex.gateway.fleet import Fleet
from cortex.gateway.lifecycle import Lifecycle
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.ondemand import OnDemand
from cortex.gateway.placer import Placer
from cortex.gateway.relay import EventStream, when_ready


@dataclass(frozen=True)
class Tuning:
    """Knobs below the config file's level (tests turn them; defaults suit production)."""

    keepalive_interval: float = 5.0  # seconds between keep-alives while a stream waits
    affinity_slack: int = 2  # extra in-flight requests a conversation's replica may carry
    retry_after: float = 5.0  # Retry-After for "still loading" and "cannot place now"
    max_attempts: int = 3  # replicas tried per request before giving up
    # How long a stream to a model with a ready replica waits, before its 200, for the neuron to
    # admit it: past a neuron's default 30 s queue timeout, so "busy" comes as a 429 status.
    admission_patience: float = 40.0


class Gateway:
    """Everything a request handler needs, built from cortex.toml and the catalogue."""

    def __init__(
        self,
        config: GatewayConfig,
        catalogue: Sequence[ModelSpec],
        *,
        extra_neurons: Iterable[NeuronEntry] = (),
        tuning: Tuning | None = None,
    ) -> None:
        self.config = config
        self.tuning = tuning or Tuning()
        section = config.gateway
        self.metrics = GatewayMetrics()
        self.fleet = Fleet(
            [*config.neurons, *extra_neurons],
            unhealthy_after=section.unhealthy_after,
            admin_token=config.auth.neuron_admin_token,
            request_timeout=section.request_timeout,
        )
        self.catalogue = LiveCatalogue(merge_catalogues(list(catalogue), config.models), self.fleet)
        self.auth = Authenticator(config.auth)
        self.accounting = Accounting(self.metrics, self.auth)
        policy = Policy(config.eviction.strategy, config.eviction.defrag_after_cycles)
        self.placer = Placer(
            self.fleet, self.catalogue, policy, self.metrics, retry_after=self.tuning.retry_after
        )
        self.ondemand = OnDemand(
            self.placer, timeout=section.load_timeout, retry_after=self.tuning.retry_after
        )
        self.dispatcher = Dispatcher(
            self.fleet,
            self.placer,
            self.ondemand,
            affinity_slack=self.tuning.affinity_slack,
            max_attempts=self.tuning.max_attempts,
        )
        self.lifecycle = Lifecycle(self.fleet, self.placer, interval=section.poll_interval)
        self.metrics.watch(self.fleet)
        # SIGTERM: /readyz fails and new calls get 503 shutting_down while streams finish.
        self.drain = Drain(section.shutdown_grace)

    async def start(self) -> None:
        """First poll before serving (routing needs it), then the background loop."""
        await self.lifecycle.tick()
        self.lifecycle.start()

    async def aclose(self) -> None:
        await self.lifecycle.aclose()
        await self.placer.aclose()
        await self.fleet.aclose()

    # -- models

    def model_card(self, spec: ModelSpec) -> FleetModelCard:
        """A /v1/models entry: the catalogue's spec, and where the placer says the model is."""
        return self.catalogue.card(spec, self.placer.availability(spec.id))

    def model_cards(self) -> list[FleetModelCard]:
        return [self.model_card(spec) for spec in self.catalogue.specs()]

    # -- per request

    def begin(
        self, request: Request, surface: Surface, model: str, affinity: str | None = None
    ) -> Call:
        """Resolve the model, check the caller may use it and has budget left; the call is kept
        on the request so the error handler can record how it ended."""
        if self.drain.draining:
            raise self.drain.refusal("the gateway")
        principal: Principal = request.state.principal
        spec = self.catalogue.resolve(model)
        self.auth.authorize(principal, spec)
        self.auth.check_budget(principal, time.time())
        call = Call(
            model=spec.id,
            surface=surface,
            principal=principal,
            deadline=time.monotonic() + self.config.gateway.load_timeout,
            affinity=affinity,
            client=request.client.host if request.client else None,
            disconnected=request.is_disconnected,
        )
        request.state.call = call
        return call

    async def stream(
        self,
        call: Call,
        path: str,
        body: dict[str, Any],
        relay: Callable[[Upstream], AsyncIterator[bytes]],
        *,
        keepalive: Callable[[], bytes],
        on_error: Callable[[CortexError], Iterable[bytes]],
    ) -> EventStream:
        """A streamed answer. Failures before the upstream opens are HTTP errors when they come
        quickly; once keep-alives have begun they become the dialect's error events."""
        # A stream's client leaving cancels the response itself; polling receive() meanwhile
        # would race the server's own disconnect listener.
        call.disconnected = None
        # A ready replica only needs admitting: wait for it without keep-alives, so a refusal
        # is a status, not an error event after a 200. A cold load gets keep-alives early.
        patience = self.tuning.keepalive_interval
        if self.placer.ready(call.model):
            patience = max(patience, self.tuning.admission_patience)
        opening = asyncio.create_task(self.dispatcher.open_stream(call, path, body))
        try:
            done, _ = await asyncio.wait({opening}, timeout=patience)
        except BaseException:
            opening.cancel()
            raise
        if done:
            upstream = opening.result()
            content = relay(upstream)
        else:

            def failed(err: CortexError) -> Iterable[bytes]:
                self.accounting.finish(call, error=err)
                return on_error(err)

            content = when_ready(
                opening,
                relay,
                keepalive=keepalive,
                interval=self.tuning.keepalive_interval,
                on_error=failed,
            )

        async def cleanup() -> None:
            # Normally the relay has done all this already; each step is idempotent.
            if not opening.done():
                opening.cancel()
            elif not opening.cancelled() and opening.exception() is None:
                await opening.result().aclose()
            self.accounting.finish(call)

        return EventStream(content, cleanup)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def authenticate(request: Request) -> None:
    """Route dependency: the caller's principal, on request.state (401 when auth rejects it)."""
    request.state.principal = gateway_of(request).auth.authenticate(request.headers)
