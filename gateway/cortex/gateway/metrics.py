"""The gateway's Prometheus metrics, on a registry of their own per app."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from cortex.core.fleet import ModelState
from cortex.gateway.registry import Fleet

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_NEURON = "none"  # label for requests that never reached a neuron

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Below 1 tok/s is where overload lands: a decode rate there must not read as "under 1".
_RATE = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class GatewayMetrics:
    """Every metric the gateway exports; a fresh registry so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        per_request = ["model", "neuron", "surface"]
        per_replica = ["model", "neuron"]
        self.spend = Counter(
            "cortex_spend_usd",
            "Spend in US dollars at the catalogue's `cost` prices, by key, model and token kind.",
            ["key", "model", "kind"],
            registry=r,
        )
        self.key_tokens = Counter(
            "cortex_key_tokens",
            "Tokens used per key (what budgets count), by kind (prompt, completion).",
            ["key", "kind"],
            registry=r,
        )
        self.requests = Counter(
            "cortex_requests", "Requests answered (any outcome).", per_request, registry=r
        )
        self.errors = Counter(
            "cortex_request_errors",
            "Requests that ended in an error, by error code.",
            [*per_request, "code"],
            registry=r,
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Time from request to last byte.",
            per_request,
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Time from request to the first streamed token.",
            per_replica,
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second",
            "Completion tokens per second of generation (after the first token when streamed).",
            per_replica,
            buckets=_RATE,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cortex_prompt_tokens",
            "Prompt tokens, as the neuron counted them.",
            per_replica,
            registry=r,
        )
        self.completion_tokens = Counter(
            "cortex_completion_tokens", "Completion tokens generated.", per_replica, registry=r
        )
        self.cold_starts = Counter(
            "cortex_cold_starts",
            "On-demand loads of a model a request waited for.",
            per_replica,
            registry=r,
        )
        self.load_seconds = Histogram(
            "cortex_load_duration_seconds",
            "Time a load took, from request to ready.",
            per_replica,
            buckets=_LATENCY,
            registry=r,
        )
        self.evictions = Counter(
            "cortex_evictions",
            "Replicas unloaded by the gateway, by reason (evict, idle, defrag).",
            [*per_replica, "reason"],
            registry=r,
        )

    def watch(self, fleet: Fleet) -> None:
        """Export the fleet's gauges (in-flight, memory, health), read at scrape time."""
        self.registry.register(_FleetCollector(fleet))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector(Collector):
    """Gauges read from the fleet when scraped: in-flight counts are live, memory as last polled."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "cortex_in_flight_requests",
            "Requests in flight through this gateway.",
            labels=["model", "neuron"],
        )
        device_memory = GaugeMetricFamily(
            "cortex_device_memory_bytes",
            "Device memory of each neuron (total, free, used), as last polled.",
            labels=["neuron", "device", "kind"],
        )
        replica_memory = GaugeMetricFamily(
            "cortex_replica_memory_bytes",
            "Memory each resident replica uses, as last polled.",
            labels=["model", "neuron"],
        )
        healthy = GaugeMetricFamily(
            "cortex_neuron_healthy", "1 when the neuron is healthy.", labels=["neuron"]
        )
        for name, handle in self.fleet.neurons.items():
            healthy.add_metric([name], 1.0 if self.fleet.healthy(name) else 0.0)
            status = handle.status
            held = [m for m in status.models if m.state != ModelState.FAILED] if status else []
            # A resident replica with nothing in flight reads 0 rather than vanishing, so a
            # dashboard's sum is 0 when idle, not "no data".
            counts = {loaded.id: 0 for loaded in held} | dict(handle.in_flight)
            for model, count in counts.items():
                in_flight.add_metric([model, name], count)
            for device in status.devices if status else []:
                device_memory.add_metric([name, device.id, "total"], device.memory_total)
                device_memory.add_metric([name, device.id, "free"], device.memory_free)
                device_memory.add_metric([name, device.id, "used"], device.memory_used)
            for loaded in held:  # a failed load holds no memory; no label to keep
                replica_memory.add_metric([loaded.id, name], loaded.memory_bytes)
        yield from (in_flight, device_memory, replica_memory, healthy)
