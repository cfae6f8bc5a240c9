"""Prometheus metrics of one neuron app (its own registry: tests and `cortex up` build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cortex.core.fleet import NeuronStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Below 1 tok/s is where overload lands: a decode rate there must not read as "under 1".
_RATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class StatusCollector(Collector):
    """Gauges read from the runtime's status at scrape time, so they are never stale."""

    def __init__(self, status: Callable[[], NeuronStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        preemptions = CounterMetricFamily(
            "cortex_neuron_preemptions",
            "Sequences preempted for KV room (their KV recomputed when they resume)",
            labels=["model"],
        )
        gauges = {
            name: GaugeMetricFamily(f"cortex_neuron_{name}", doc, labels=labels)
            for name, doc, labels in (
                ("in_flight", "Requests holding an admission slot", ["model"]),
                ("queued", "Requests waiting for a slot", ["model"]),
                ("batch_size", "Sequences in the engine's running batch", ["model"]),
                (
                    "kv_waiting",
                    "Admitted sequences the engine holds back for KV room (preempted included)",
                    ["model"],
                ),
                ("model_memory_bytes", "Memory budgeted for the model", ["model"]),
                ("model_ready", "1 when the model serves requests", ["model"]),
                ("model_load_progress", "Load progress 0..1", ["model"]),
                ("device_memory_total_bytes", "Device memory in total", ["device"]),
                ("device_memory_used_bytes", "Device memory in use", ["device"]),
                ("device_memory_free_bytes", "Device memory free", ["device"]),
                ("device_healthy", "1 while the device worker accepts work", ["device"]),
            )
        }
        for model in status.models:
            labels = [model.id]
            gauges["in_flight"].add_metric(labels, model.in_flight)
            gauges["queued"].add_metric(labels, model.queued)
            gauges["batch_size"].add_metric(labels, model.batch_size)
            gauges["kv_waiting"].add_metric(labels, model.kv_waiting)
            preemptions.add_metric(labels, model.preemptions)
            gauges["model_memory_bytes"].add_metric(labels, model.memory_bytes)
            gauges["model_ready"].add_metric(labels, float(model.state == "ready"))
            gauges["model_load_progress"].add_metric(labels, model.progress)
        for device in status.devices:
            labels = [device.id]
            gauges["device_memory_total_bytes"].add_metric(labels, device.memory_total)
            gauges["device_memory_used_bytes"].add_metric(labels, device.memory_used)
            gauges["device_memory_free_bytes"].add_metric(labels, device.memory_free)
            gauges["device_healthy"].add_metric(labels, float(device.healthy))
        yield from gauges.values()
        yield preemptions
        open_gauge = GaugeMetricFamily(
            "cortex_neuron_lifecycle_open",
            "1 when load/unload need no admin token and the neuron listens beyond loopback",
        )
        open_gauge.add_metric([], float(status.lifecycle_open))
        yield open_gauge


class NeuronMetrics:
    """Counters and histograms the API updates per request, plus the status gauges."""

    def __init__(self, status: Callable[[], NeuronStatus]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_neuron_requests",
            "Inference requests answered",
            ["model", "route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cortex_neuron_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "cortex_neuron_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "cortex_neuron_cached_prompt_tokens",
            "Prompt tokens reused from cache",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_neuron_time_to_first_token_seconds",
            "From request arrival to the first generated text",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_neuron_tokens_per_second",
            "Decode rate of one request after its first token",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "cortex_neuron_request_duration_seconds",
            "Whole request time, streams included",
            ["model", "route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.constrained = Counter(
            "cortex_neuron_constrained_requests",
            "Requests whose output follows a grammar (json_object, json_schema, tool_call)",
            ["model", "kind"],
            registry=r,
        )
        self.grammar_compile = Histogram(
            "cortex_neuron_grammar_compile_seconds",
            "Compiling a grammar that was not cached yet",
            ["model"],
            buckets=_COMPILE_BUCKETS,
            registry=r,
        )
        r.register(StatusCollector(status))

    def observe_generation(
        self,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        ttft: float | None,
        decode_seconds: float | None,
    ) -> None:
        """Record one finished (or abandoned) generation."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generated_tokens.labels(model).inc(completion_tokens)
        if cached_tokens:
            self.cached_tokens.labels(model).inc(cached_tokens)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if decode_seconds and completion_tokens > 1:
            self.tokens_per_second.labels(model).observe((completion_tokens - 1) / decode_seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
