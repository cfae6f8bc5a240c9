"""The gateway's Prometheus metrics (SPEC G7), on a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cortex.gateway.fleet import Fleet

CONTENT_TYPE = CONTENT_TYPE_LATEST
NO_NEURON = "none"  # label for requests that never reached a neuron

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_RATE = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class GatewayMetrics:
    """Every metric the gateway exports; a fresh registry so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        per_request = ["model", "neuron", "surface"]
        per_replica = ["model", "neuron"]
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
        self.in_flight = Gauge(
            "cortex_in_flight_requests",
            "Requests in flight through this gateway.",
            per_replica,
            registry=r,
        )
        self.device_memory = Gauge(
            "cortex_device_memory_bytes",
            "Device memory of each neuron, as last polled.",
            ["neuron", "device", "kind"],
            registry=r,
        )
        self.replica_memory = Gauge(
            "cortex_replica_memory_bytes",
            "Memory each resident replica uses, as last polled.",
            per_replica,
            registry=r,
        )
        self.neuron_healthy = Gauge(
            "cortex_neuron_healthy", "1 when the neuron is healthy.", ["neuron"], registry=r
        )

    def observe_fleet(self, fleet: Fleet) -> None:
        """Refresh the polled gauges; labels of things that disappeared are dropped."""
        self.device_memory.clear()
        self.replica_memory.clear()
        self.neuron_healthy.clear()
        for name, handle in fleet.neurons.items():
            self.neuron_healthy.labels(name).set(1 if fleet.healthy(name) else 0)
            if handle.status is None:
                continue
            for device in handle.status.devices:
                self.device_memory.labels(name, device.id, "total").set(device.memory_total)
                self.device_memory.labels(name, device.id, "free").set(device.memory_free)
                self.device_memory.labels(name, device.id, "used").set(device.memory_used)
            for model in handle.status.models:
                self.replica_memory.labels(model.id, name).set(model.memory_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
