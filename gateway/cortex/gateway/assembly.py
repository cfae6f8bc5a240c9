"""The gateway's parts, built once from cortex.toml: fleet, catalogue, placement, the proxy, auth
and metrics. Nothing here runs per request: that is the proxy's (proxy/proxy.py).

Who places replicas is the one choice made here (replicas.py): this gateway over a static fleet of
[[neurons]], or the operator on Kubernetes, whose ModelPlacements and Neurons the gateway watches."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cortex.core.catalogue import ModelSpec, merge_catalogues
from cortex.core.config import (
    AuthSection,
    ConfigError,
    GatewayConfig,
    GatewaySection,
    NeuronEntry,
)
from cortex.core.kube_api import KubeApi, KubeLogin
from cortex.core.placement.model import Policy
from cortex.core.reload import differing, named_change
from cortex.core.shutdown import Drain
from cortex.gateway.activity import Activity
from cortex.gateway.auth import Authenticator
from cortex.gateway.catalogue import Catalogue, FleetModelCard, LiveCatalogue
from cortex.gateway.demand import DemandSignal
from cortex.gateway.kube_catalogue import PlacementCatalogue
from cortex.gateway.kube_fleet import KubeFleet
from cortex.gateway.kube_spend import KubeSpendStore
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

log = logging.getLogger(__name__)


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
    spend_interval: float = 2.0  # Kubernetes: seconds between syncs of the shared budget spend


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
        # Kept for a reload, which re-reads cortex.toml only.
        self._base_catalogue, self._extra_neurons = list(catalogue), list(extra_neurons)
        section = config.gateway
        self.metrics = GatewayMetrics()
        self.activity = Activity(self.metrics)  # the fleet page's live rates
        self.fleet = Fleet(
            [*config.neurons, *self._extra_neurons] if kubernetes is None else [],
            unhealthy_after=section.unhealthy_after,
            admin_token=config.auth.neuron_admin_secret(),
            request_timeout=section.request_timeout,
        )
        self.auth = Authenticator(config.auth)
        self._spend: SqliteSpendStore | KubeSpendStore | None = None  # opened for a budget
        self.ledger = Ledger(None)
        known = merge_catalogues(list(catalogue), config.models)
        self.catalogue: Catalogue
        self.replicas: Replicas
        self.cold_start: ColdStart
        self.source: FleetSource
        if kubernetes is None:
            self._place_here(known)
        else:
            self._follow_operator(kubernetes, known)
        self._use_spend(config.auth, self._new_spend_store(config.auth))
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
            accounting=Accounting(self.metrics, usage_log=section.usage_log),
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
        kube = self._kube = KubeFleet(KubeApi(login), login.namespace, self.fleet)
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
        if isinstance(self._spend, KubeSpendStore):
            await self._spend.open()

    def _new_spend_store(self, auth: AuthSection) -> SqliteSpendStore | KubeSpendStore | None:
        """The spend store to open when a key first has a budget (a ConfigMap on Kubernetes when
        `spend_configmap` names one, else `spend_db`), else None. ConfigError when the file
        cannot be opened; nothing is changed yet."""
        if self._spend is not None or all(k.budget_tokens is None for k in auth.keys):
            return None
        name = self.config.auth.spend_configmap  # both read at start only
        if self.kubernetes is not None and name is not None:
            return KubeSpendStore(
                self._kube.api, self.kubernetes.namespace, name, interval=self.tuning.spend_interval
            )
        path = self.config.auth.spend_db
        try:
            return SqliteSpendStore(path)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"auth.spend_db {path}: {exc}") from exc

    def _use_spend(
        self, auth: AuthSection, fresh: SqliteSpendStore | KubeSpendStore | None
    ) -> None:
        """Keep spend in `fresh` when given; tell the store each key's window."""
        if fresh is not None:
            self._spend = self.ledger.store = fresh
        if self._spend is not None:
            self._spend.windows = {
                k.name: k.budget_window for k in auth.keys if k.budget_tokens is not None
            }

    async def reload(self, config: GatewayConfig) -> list[str]:
        """Apply a re-read cortex.toml to the running gateway (SIGHUP; README.md, "Changing it
        while the gateway runs"). The API keys, the models, the [[neurons]] and the eviction
        strategy change at once; a change to anything else waits for a restart, and the answer
        says so. A key that cannot be read, or a spend store that cannot be opened for a first
        budget (ConfigError), changes nothing. Returns one line per change, for the log."""
        old = self.config
        # The steps that can fail come first: a key with a budget is never live without a store.
        fresh = self._new_spend_store(config.auth)
        try:
            self.auth.use(config.auth)
        except BaseException:
            if isinstance(fresh, SqliteSpendStore):
                fresh.close()
            raise
        self._use_spend(config.auth, fresh)
        if isinstance(fresh, KubeSpendStore):
            await fresh.open()
        changes = [named_change("api keys", _key_names(old), _key_names(config))]
        if from_env := sorted(key.name for key in config.auth.keys if key.key_env):
            log.warning(
                "api keys %s come from environment variables, as the gateway started with them: "
                "a reload does not rotate them (restart, or keep them in a key_file)",
                ", ".join(from_env),
            )
        known = merge_catalogues(self._base_catalogue, config.models)
        before = {spec.id: spec for spec in merge_catalogues(self._base_catalogue, old.models)}
        self.catalogue.use(known)
        changes.append(named_change("models", before, {spec.id: spec for spec in known}))
        if self.kubernetes is None:  # on Kubernetes the Neurons and the operator say these
            changes.append(await self._reload_neurons([*config.neurons, *self._extra_neurons]))
            eviction = config.eviction
            if eviction != old.eviction:
                self.placer.policy = Policy(eviction.strategy, eviction.defrag_after_cycles)
                cycles = eviction.defrag_after_cycles
                changes.append(f"eviction: {eviction.strategy}, defrag_after_cycles {cycles}")
        # models_file is not among them: its models were read again above.
        fields = [name for name in GatewaySection.model_fields if name != "models_file"]
        later = [f"gateway.{name}" for name in differing(old.gateway, config.gateway, fields)]
        restart = ("spend_db", "spend_configmap", "neuron_admin_token", "neuron_admin_token_file")
        later += [f"auth.{name}" for name in differing(old.auth, config.auth, restart)]
        if later:
            changes.append(f"needs a restart to change: {', '.join(later)}")
        kept = {name: getattr(old.auth, name) for name in restart}
        self.config = old.model_copy(
            update={
                "auth": config.auth.model_copy(update=kept),
                "models": config.models,
                "neurons": config.neurons,
                "eviction": config.eviction,
            }
        )
        return [line for line in changes if line]

    async def _reload_neurons(self, entries: list[NeuronEntry]) -> str:
        """A new neuron is polled before this returns; one taken out takes no new requests and
        leaves once those running end; a new endpoint or token is a new client."""
        wanted = {entry.name: entry for entry in entries}
        present = {name: handle.entry for name, handle in self.fleet.members().items()}
        for name in present.keys() - wanted.keys():
            self.fleet.retire(name)
        fresh = []
        for name, entry in wanted.items():
            was = present.get(name)
            if was is not None and _address(was) == _address(entry):
                self.fleet[name].entry = entry  # its labels may have changed
            else:
                self.fleet.replace(entry)
                fresh.append(name)
        await asyncio.gather(*(self.fleet.refresh(name) for name in fresh))
        return named_change("neurons", present, wanted)

    async def aclose(self) -> None:
        if isinstance(self._spend, KubeSpendStore):
            await self._spend.aclose()  # its last charges, before the API client closes
        elif self._spend is not None:
            self._spend.close()
        if self.kubernetes is None:
            await self.poller.aclose()
            await self.placer.aclose()
        else:
            await self.demand.aclose()
            await self.source.aclose()
        await self.fleet.aclose()

    # -- models

    def model_card(self, spec: ModelSpec) -> FleetModelCard:
        """A /v1/models entry: the catalogue's spec, and where its replicas are."""
        return self.catalogue.card(spec, self.replicas.availability(spec.id))

    def model_cards(self) -> list[FleetModelCard]:
        return [self.model_card(spec) for spec in self.catalogue.specs()]


def _key_names(config: GatewayConfig) -> dict[str, Any]:
    return {key.name: key for key in config.auth.keys}


def _address(entry: NeuronEntry) -> tuple[str, str | None]:
    """Where and as whom a neuron is reached: a change needs a new client."""
    return entry.endpoint, entry.admin_token
