"""docs/grafana/cortex.json (docs/grafana/README.md): every series it queries is one cortex really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cortex.core.fleet import NeuronStatus
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.registry import Fleet
from cortex.neuron.metrics import NeuronMetrics
from cortex.operator.metrics import OperatorMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "cortex.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(exposition: bytes) -> set[str]:
    """Series names an exposition's families yield, by type (labelled families with no sample
    yet are listed too: their HELP and TYPE lines are there from the start)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition.decode())
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_queried_series_is_exported() -> None:
    gateway = GatewayMetrics()
    gateway.watch(Fleet([]))
    neuron = NeuronMetrics(lambda: NeuronStatus(node="n", version="0"))
    operator = OperatorMetrics(pending=[], backing_off=lambda: 0)
    series = exported(gateway.exposition()) | exported(neuron.exposition())
    series |= exported(generate_latest(operator.registry))
    queried = {name for expr in queries() for name in re.findall(r"\bcortex_\w+", expr)}
    assert queried, "the dashboard queries nothing"
    assert queried <= series, f"not exported: {sorted(queried - series)}"


def test_every_g7_series_has_a_panel() -> None:
    """Each metric the gateway must export is on the dashboard."""
    text = " ".join(queries())
    for name in (
        "cortex_requests_total",
        "cortex_request_errors_total",
        "cortex_request_duration_seconds_bucket",
        "cortex_time_to_first_token_seconds_bucket",
        "cortex_tokens_per_second_bucket",
        "cortex_prompt_tokens_total",
        "cortex_completion_tokens_total",
        "cortex_cold_starts_total",
        "cortex_evictions_total",
        "cortex_in_flight_requests",
        "cortex_device_memory_bytes",
    ):
        assert name in text


def test_queries_select_the_jobs_and_datasource_from_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "gateway_job", "neuron_job", "operator_job"}
    for expr in queries():
        assert any(f'${job}"' in expr for job in ("gateway_job", "neuron_job", "operator_job"))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
