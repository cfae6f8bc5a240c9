"""The gateway's parts wired together: fleet, catalogue, placement, dispatch, auth and metrics.

Who places replicas is the one choice made here (replicas.py): this gateway over a static fleet of
[[neurons]], or the operator on Kubernetes, whose ModelPlacements and Neurons the gateway watches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from cortex.core.catalogue import ModelSpec, merge_catalogues, unknown_model
from cortex.core.config import GatewayConfig, NeuronEntry
from cortex.core.errors import CortexError, ModelNotFound
from cortex.core.kube_api import KubeApi, KubeLogin
from cortex.core.placement.model import Policy
from cortex.core.shutdown import Drain
from cortex.gateway.auth import Authenticator, Principal
from cortex.gateway.budget import check_output_limit, worst_case
from cortex.gateway.call import Accounting, Call, Surface
from cortex.gateway.catalogue import Catalogue, FleetModelCard, LiveCatalogue
from cortex.gateway.demand import DemandSignal
from cortex.gateway.dispatch import Dispatcher, Upstream
from cortex.gateway.fleet import Fleet
from cortex.gateway.kube_catalogue import PlacementCatalogue
from cortex.gateway.kube_fleet import KubeFleet
from cortex.gateway.ledger import Ledger, SqliteSpendStore
from cortex.gateway.lifecycle import Lifecycle
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.ondemand import OnDemand
from cortex.gateway.placer import Placer
from cortex.gateway.relay import EventStream, when_ready
from cortex.gateway.replicas import ColdStart, FleetSource, Replicas


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
    demand_interval: float = 5.0  # Kubernetes: least time between demand patches of a placement


class Gateway:
    """Everything a request handler needs, built from cortex.toml and the catalogue: over the
    static fleet of [[neurons]], or, given `kubernetes`, over the CRDs of that namespace."""

    # This gateway's own placement: a static fleet's only (on Kubernetes the operator places).
    placer: Placer
    ondemand: OnDemand
    lifecycle: Lifecycle
    # The operator's part on Kubernetes: asking it for a cold model.
    demand: DemandSignal

    def __init__(
        self,
        config: GatewayConfig,
        catalogue: Sequence[ModelSpec],
        *,
        extra_neurons: Iterable[NeuronEntry] = (),
        tuning: Tuning | None = None,
        kubernetes: KubeLogin | None = None,
    ) -> None:
        self.config = config
        self.tuning = tuning or Tuning()
        self.kubernetes = kubernetes
        section = config.gateway
        self.metrics = GatewayMetrics()
        self.fleet = Fleet(
            [*config.neurons, *extra_neurons] if kubernetes is None else [],
            unhealthy_after=section.unhealthy_after,
            admin_token=config.auth.neuron_admin_token,
            request_timeout=section.request_timeout,
        )
        self.auth = Authenticator(config.auth)
        budgeted = any(key.budget_tokens is not None for key in config.auth.keys)
        self._spend = SqliteSpendStore(config.auth.spend_db) if budgeted else None
        self.ledger = Ledger(self._spend)
        self.accounting = Accounting(self.metrics)
        known = merge_catalogues(list(catalogue), config.models)
        self.catalogue: Catalogue
        self.replicas: Replicas
        self.cold_start: ColdStart
        self.source: FleetSource
        if kubernetes is None:
            self._place_here(known)
        else:
            self._follow_operator(kubernetes, known)
        self.dispatcher = Dispatcher(
            self.fleet,
            self.replicas,
            self.cold_start,
            affinity_slack=self.tuning.affinity_slack,
            max_attempts=self.tuning.max_attempts,
        )
        self.metrics.watch(self.fleet)
        # SIGTERM: /readyz fails and new calls get 503 shutting_down while streams finish.
        self.drain = Drain(config.gateway.shutdown_grace)

    def _place_here(self, known: list[ModelSpec]) -> None:
        """A static fleet: this gateway polls its neurons and places models itself."""
        section = self.config.gateway
        catalogue = LiveCatalogue(known, self.fleet)
        eviction = self.config.eviction
        self.placer = Placer(
            self.fleet,
            catalogue,
            Policy(eviction.strategy, eviction.defrag_after_cycles),
            self.metrics,
            retry_after=self.tuning.retry_after,
        )
        self.ondemand = OnDemand(
            self.placer, timeout=section.load_timeout, retry_after=self.tuning.retry_after
        )
        self.lifecycle = Lifecycle(self.fleet, self.placer, interval=section.poll_interval)
        self.catalogue, self.replicas = catalogue, self.placer
        self.cold_start, self.source = self.ondemand, self.lifecycle

    def _follow_operator(self, login: KubeLogin, known: list[ModelSpec]) -> None:
        """Kubernetes: the fleet is what the ModelPlacements and Neurons of the namespace say;
        a cold model is asked of the operator (docs/kubernetes.md)."""
        kube = KubeFleet(KubeApi(login), login.namespace, self.fleet)
        self.catalogue = PlacementCatalogue(kube, known)
        self.demand = DemandSignal(
            kube,
            timeout=self.config.gateway.load_timeout,
            retry_after=self.tuning.retry_after,
            interval=self.tuning.demand_interval,
        )
        self.replicas, self.cold_start, self.source = kube, self.demand, kube

    async def start(self) -> None:
        """The fleet's first picture before serving (routing needs it), then keep it current."""
        await self.source.open()

    async def aclose(self) -> None:
        if self.kubernetes is None:
            await self.lifecycle.aclose()
            await self.placer.aclose()
        else:
            await self.demand.aclose()
            await self.source.aclose()
        await self.fleet.aclose()
        if self._spend is not None:
            self._spend.close()

    # -- models

    def model_card(self, spec: ModelSpec) -> FleetModelCard:
        """A /v1/models entry: the catalogue's spec, and where its replicas are."""
        return self.catalogue.card(spec, self.replicas.availability(spec.id))

    def model_cards(self) -> list[FleetModelCard]:
        return [self.model_card(spec) for spec in self.catalogue.specs()]

    # -- per request

    def begin(
        self,
        request: Request,
        surface: Surface,
        model: str,
        affinity: str | None = None,
        *,
        body: Mapping[str, Any] | None = None,
    ) -> Call:
        """Resolve the model, check the caller may use it, and reserve the request's worst case
        (`body`'s; nothing for a body-less call) from their budget. The call, holding the
        reservation, is kept on the request: CallScope ends it, whatever happens."""
        if self.drain.draining:
            raise self.drain.refusal("the gateway")
        principal: Principal = request.state.principal
        try:
            spec = self.catalogue.resolve(model)
        except ModelNotFound:
            # Guess only among models this caller may use: a hint must not reveal the others.
            visible = [s for s in self.catalogue.specs() if self.auth.allows(principal, s)]
            raise ModelNotFound(unknown_model(visible, model), param="model") from None
        self.auth.authorize(principal, spec)
        if body is not None:
            check_output_limit(spec, body)
        tokens = (
            worst_case(body, embedding=spec.kind == "embedding", context=spec.context)
            if body is not None
            else 0
        )
        reservation = self.ledger.reserve(principal, tokens, time.time())
        call = Call(
            model=spec.id,
            surface=surface,
            principal=principal,
            deadline=time.monotonic() + self.config.gateway.load_timeout,
            affinity=affinity,
            client=request.client.host if request.client else None,
            disconnected=request.is_disconnected,
            reservation=reservation,
            cost=spec.cost,
            strict_max_tokens=_first_set(
                spec.strict_max_tokens, self.config.gateway.strict_max_tokens
            ),
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
        if self.replicas.ready(call.model):
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


def _first_set(*choices: bool | None) -> bool | None:
    return next((choice for choice in choices if choice is not None), None)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def authenticate(request: Request) -> None:
    """Route dependency: the caller's principal, on request.state (401 when auth rejects it)."""
    request.state.principal = gateway_of(request).auth.authenticate(request.headers)


def authenticate_admin(request: Request) -> None:
    """Route dependency of the admin surface (fleet view, docs): 401 or 403 unless an admin key."""
    request.state.principal = gateway_of(request).auth.authenticate_admin(request.headers)
