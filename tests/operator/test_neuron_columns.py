"""`kubectl get nr` shows every device and model: a printer column takes one value per object
(the API server keeps a JSONPath's first result), so the columns read the comma-joined summaries
the operator writes into the Neuron's status, which the CRD's schema accepts."""

from __future__ import annotations

from typing import Any

from fakes.cluster import CrdValidator, load_crd, served_version

from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus
from cortex.core.resources import Neuron
from cortex.operator.neurons import Probe, neuron_status

GIB = 2**30
NOW = 1_800_000_000.0


def _answer() -> NeuronStatus:
    devices = [
        DeviceStatus(
            id=f"cuda-dev-{i}",
            index=i,
            kind="cuda",
            name="H100",
            memory_total=80 * GIB,
            memory_free=70 * GIB,
            memory_used=10 * GIB,
        )
        for i in (0, 1)
    ]
    models = [
        LoadedModel(id=m, source="", state=ModelState.READY, memory_bytes=GIB, loaded_at=NOW)
        for m in ("smollm2-135m-instruct", "all-minilm-l6-v2")
    ]
    return NeuronStatus(node="gpu-node-1", version="1", devices=devices, models=models)


def _column(obj: dict[str, Any], json_path: str) -> Any:
    """A printer column's cell as the API server fills it: the first value the path finds."""
    values: list[Any] = [obj]
    for part in json_path.lstrip(".").split("."):
        name, each = part.removesuffix("[*]"), part.endswith("[*]")
        values = [v[name] for v in values if isinstance(v, dict) and name in v]
        if each:
            values = [item for v in values for item in v]
    return values[0] if values else None


def _cells(neuron: Neuron, probe: Probe | None) -> tuple[dict[str, Any], dict[str, Any]]:
    status = neuron_status(neuron, probe, 2, NOW).wire()
    obj = {**neuron.model_dump(by_alias=True, exclude_none=True, mode="json"), "status": status}
    crd = load_crd("neurons")
    assert CrdValidator(crd).errors(obj) == []  # the status patch the API server takes
    columns = served_version(crd)["additionalPrinterColumns"]
    return {c["name"]: _column(obj, c["jsonPath"]) for c in columns}, status


def test_the_columns_list_every_device_and_model() -> None:
    neuron = Neuron.model_validate(
        {"metadata": {"name": "gpu-node-1"}, "spec": {"endpoint": "http://10.0.3.17:13131"}}
    )
    cells, _ = _cells(neuron, Probe("http://10.0.3.17:13131", NOW, _answer()))
    assert cells["Devices"] == "cuda-dev-0,cuda-dev-1"
    assert cells["Models"] == "smollm2-135m-instruct,all-minilm-l6-v2"
    assert (cells["Free"], cells["Phase"]) == ("140Gi", "Ready")


def test_a_neuron_lost_to_the_fleet_clears_its_models_column() -> None:
    """Empty, not absent: the status goes out as a merge patch, which keeps absent keys."""
    neuron = Neuron.model_validate({"metadata": {"name": "n"}, "spec": {"endpoint": "http://n"}})
    neuron.status = neuron_status(neuron, Probe("http://n", NOW, _answer()), 2, NOW)
    lost = Probe("http://n", NOW + 10, None, error="refused", failures=2)
    cells, status = _cells(neuron, lost)
    assert status["modelSummary"] == "" and cells["Models"] == ""
    assert cells["Phase"] == "Unreachable"
