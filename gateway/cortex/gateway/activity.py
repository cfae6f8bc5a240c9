"""Live traffic per model for the fleet page: requests/s, tokens/s and time to first token over the
last few seconds, from the gateway's own counters (metrics.py), read in process, never scraped."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from cortex.core.fleet import FleetActivity, ModelActivity
from cortex.gateway.metrics import GatewayMetrics

WINDOW = 10.0  # seconds: long enough to smooth, short enough to look live


@dataclass(frozen=True)
class Totals:
    """One model's counters at one moment (sums over neurons and surfaces)."""

    requests: float = 0.0
    tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0


def totals(metrics: GatewayMetrics) -> dict[str, Totals]:
    """Every model's counters as they stand."""
    fields: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for field, suffix, families in (
        ("requests", "_total", metrics.requests.collect()),
        ("tokens", "_total", metrics.completion_tokens.collect()),
        ("ttft_sum", "_sum", metrics.ttft.collect()),
        ("ttft_count", "_count", metrics.ttft.collect()),
    ):
        for model, value in _samples(families, suffix):
            fields[model][field] += value
    return {model: Totals(**values) for model, values in fields.items()}


def _samples(families: Iterable[Metric], suffix: str) -> Iterable[tuple[str, float]]:
    for family in families:
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample.labels["model"], sample.value


def rates(before: dict[str, Totals], after: dict[str, Totals], seconds: float) -> FleetActivity:
    """What happened between two readings, per second (pure)."""
    seconds = max(seconds, 1e-9)
    models = []
    for model in sorted(after):
        now, then = after[model], before.get(model, Totals())
        streams = now.ttft_count - then.ttft_count
        models.append(
            ModelActivity(
                model=model,
                requests_per_second=(now.requests - then.requests) / seconds,
                tokens_per_second=(now.tokens - then.tokens) / seconds,
                ttft_seconds=(now.ttft_sum - then.ttft_sum) / streams if streams else None,
            )
        )
    return FleetActivity(window_seconds=seconds, models=models)


class Activity:
    """Readings of the counters, each view against one about WINDOW seconds old (the gateway's
    start, at first: nothing had happened then)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics, self.window, self.clock = metrics, window, clock
        self._readings: deque[tuple[float, dict[str, Totals]]] = deque([(clock(), {})])

    def view(self) -> FleetActivity:
        now, current = self.clock(), totals(self.metrics)
        self._readings.append((now, current))
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.window:
            self._readings.popleft()  # the next one still spans the window
        then, before = self._readings[0]
        return rates(before, current, now - then)
