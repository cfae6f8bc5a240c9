"""The gateway's parts, built once from cortex.toml: fleet, catalogue, placement, the proxy, auth
and metrics. Nothing here runs per request: that is the proxy's (proxy/proxy.py).

Who places replicas is the one choice made here (replicas.py): this gateway over a static fleet of
[[neurons]], or the operator on Kubernetes, whose ModelPlacements and Neurons the gateway watches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cortex.core.catalogue import ModelSpec, merge_catalogues
from cortex.core.config import GatewayConfig, NeuronEntry
from cortex.core.kube_api import KubeApi, KubeLogin
from cortex.core.placement.model import Policy
from cortex.core.shutdown import Drain
from cortex.gateway.activity import Activity
from cortex.gateway.auth import Authenticator
from cortex.gateway.catalogue import Catalogue, FleetModelCard, LiveCatalogue
from cortex.gateway.demand import DemandSignal
from cortex.gateway.kube_catalogue import PlacementCatalogue
from cortex.gateway.kube_fleet import KubeFleet
from cortex.gateway.ledger import Ledger, SqliteSpendStore
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.ondemand import OnDemand
from cortex.gateway.placer import Placer
from cortex.gateway.poller import Poller
from cortex.gateway.proxy.dispatch import Dispatcher
from cortex.gateway.proxy.exchange import Accounting
from cortex.gateway.proxy.proxy import Patience, Proxy
from cortex.gateway.registry import Fleet
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
    poller: Poller
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
        self.activity = Activity(self.metrics)  # the fleet page's live rates
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
        known = merge_catalogues(list(catalogue), config.models)
        self.catalogue: Catalogue
        self.replicas: Replicas
        self.cold_start: ColdStart
        self.source: FleetSource
        if kubernetes is None:
            self._place_here(known)
        else:
            self._follow_operator(kubernetes, known)
        self.metrics.watch(self.fleet)
        # SIGTERM: /readyz fails and new calls get 503 shutting_down while streams finish.
        self.drain = Drain(config.gateway.shutdown_grace)
        self.proxy = Proxy(
            catalogue=self.catalogue,
            auth=self.auth,
            ledger=self.ledger,
            replicas=self.replicas,
            dispatcher=Dispatcher(
                self.fleet,
                self.replicas,
                self.cold_start,
                affinity_slack=self.tuning.affinity_slack,
                max_attempts=self.tuning.max_attempts,
            ),
            accounting=Accounting(self.metrics),
            drain=self.drain,
            patience=Patience(self.tuning.keepalive_interval, self.tuning.admission_patience),
            load_timeout=section.load_timeout,
            strict_max_tokens=section.strict_max_tokens,
        )

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
        self.poller = Poller(self.fleet, self.placer, interval=section.poll_interval)
        self.catalogue, self.replicas = catalogue, self.placer
        self.cold_start, self.source = self.ondemand, self.poller

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
            await self.poller.aclose()
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
