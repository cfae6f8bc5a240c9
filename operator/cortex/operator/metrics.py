"""The operator's Prometheus metrics (docs/kubernetes.md, "The operator's metrics"): what it asked
of the neurons and how that went, its probes and its plans, served on `--metrics-port`."""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

UnloadReason = Literal["evict", "idle", "excess", "replaced", "delete"]
_PLAN_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class OperatorMetrics:
    """Every metric one operator process exports, in a registry of its own."""

    def __init__(self, pending: Sized, backing_off: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self._server: WSGIServer | None = None
        self.loads = Counter(
            "cortex_operator_loads", "Loads the operator asked of neurons, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.unloads = Counter(
            "cortex_operator_unloads",
            "Unloads the operator asked of neurons, by reason (evict, idle, excess, replaced, delete) and "
            "outcome.",
            ["reason", "outcome"], registry=r,
        )  # fmt: skip
        self.probes = Counter(
            "cortex_operator_probes", "Probes of neurons' /status, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.plan_seconds = Histogram(
            "cortex_operator_plan_duration_seconds", "Time one plan of a namespace's fleet took.",
            buckets=_PLAN_SECONDS, registry=r,
        )  # fmt: skip
        _gauge(r, "cortex_operator_pending_loads", "Loads on their way.", pending.__len__)
        _gauge(
            r, "cortex_operator_backing_off_placements",
            "Placements whose last load failed, waiting out the backoff before the next try.",
            backing_off,
        )  # fmt: skip

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve /metrics on its own thread (prometheus_client's server), beside kopf's loop."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _gauge(registry: CollectorRegistry, name: str, text: str, read: Callable[[], int]) -> None:
    Gauge(name, text, registry=registry).set_function(read)
