"""The neuron's Prometheus exposition read from its status (metrics.py), parsed with
prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cortex.core.fleet import LoadedModel, ModelState, NeuronStatus
from cortex.neuron.metrics import NeuronMetrics


def _samples(metrics: NeuronMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


def test_decode_rates_below_one_token_per_second_are_told_apart() -> None:
    # Overload slows decoding below 1 tok/s: 0.3 and 0.9 must not share one bucket.
    metrics = NeuronMetrics(lambda: NeuronStatus(node="n", version="0"))
    metrics.observe_generation(
        "m", prompt_tokens=5, completion_tokens=4, cached_tokens=0, ttft=1.0, decode_seconds=10.0
    )
    values = _samples(metrics)
    bucket = "cortex_neuron_tokens_per_second_bucket"
    assert values[(bucket, (("le", "0.25"), ("model", "m")))] == 0
    assert values[(bucket, (("le", "0.5"), ("model", "m")))] == 1


def test_batch_size_is_the_engines_batch_and_kv_waits_are_seen() -> None:
    # Four requests hold admission slots; the engine runs two, holds two back for KV room, and
    # has preempted three sequences so far.
    model = LoadedModel(
        id="m",
        source="file:/m",
        state=ModelState.READY,
        in_flight=4,
        batch_size=2,
        kv_waiting=2,
        preemptions=3,
    )
    metrics = NeuronMetrics(lambda: NeuronStatus(node="n", version="0", models=[model]))
    values = _samples(metrics)
    labels = (("model", "m"),)
    assert values[("cortex_neuron_in_flight", labels)] == 4
    assert values[("cortex_neuron_batch_size", labels)] == 2
    assert values[("cortex_neuron_kv_waiting", labels)] == 2
    assert values[("cortex_neuron_preemptions_total", labels)] == 3
