"""The CRD manifests (crds/*.yaml), the example resources and the pydantic models agree."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.cluster import CEL_RULES, CrdValidator, load_crd, served_version
from pydantic import ValidationError

from cortex.core.resources import (
    DEMAND_ANNOTATION,
    ModelPlacement,
    ModelPlacementStatus,
    Neuron,
    NeuronResourceStatus,
    PlacementDemand,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"
PLACEMENTS = CrdValidator(load_crd("modelplacements"))
NEURONS = CrdValidator(load_crd("neurons"))


def examples() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(EXAMPLES.glob("*.yaml"))]


def placement(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cortex.helexa.ai/v1alpha1",
        "kind": "ModelPlacement",
        "metadata": {"name": "m"},
        "spec": {"model": "smollm2-135m-instruct", **spec},
    }


def test_examples_cover_a_pinned_an_on_demand_model_and_an_external_neuron() -> None:
    found = examples()
    placements = [e for e in found if e["kind"] == "ModelPlacement"]
    assert any(e["spec"].get("pinned") for e in placements)
    assert any(e["spec"]["replicas"]["min"] == 0 for e in placements)
    assert any(e["kind"] == "Neuron" and e["spec"].get("endpoint") for e in found)


@pytest.mark.parametrize("example", examples(), ids=lambda e: e["metadata"]["name"])
def test_examples_validate_against_their_crd(example: dict[str, Any]) -> None:
    validator = NEURONS if example["kind"] == "Neuron" else PLACEMENTS
    assert validator.errors(validator.defaulted(example)) == []


@pytest.mark.parametrize("example", examples(), ids=lambda e: e["metadata"]["name"])
def test_models_round_trip_the_examples(example: dict[str, Any]) -> None:
    model = Neuron if example["kind"] == "Neuron" else ModelPlacement
    parsed = model.model_validate(example)
    assert parsed.model_dump(by_alias=True, exclude_unset=True) == example


def test_defaults_fill_replicas_pinning_priority_and_devices() -> None:
    stored = PLACEMENTS.validate(placement())
    assert stored["spec"]["replicas"] == {"min": 1, "max": 1}
    assert stored["spec"]["pinned"] is False
    assert stored["spec"]["priority"] == 0
    assert stored["spec"]["resources"] == {"devices": 1}
    parsed = ModelPlacement.model_validate(placement()).spec
    assert (parsed.replicas.min, parsed.replicas.max, parsed.resources.devices) == (1, 1, 1)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"replicas": {"min": -1, "max": 1}}, "min"),
        ({"replicas": {"min": 1, "max": 0}}, "max"),
        ({"replicas": {"min": 3, "max": 2}}, "must not exceed"),
        ({"replicas": {"min": 2}}, "must not exceed"),  # max defaults to 1
        ({"idleTimeout": "soon"}, "idleTimeout"),
        ({"resources": {"memory": "lots"}}, "memory"),
        ({"resources": {"devices": 0}}, "devices"),
        ({"source": "s3://bucket/model"}, "source"),
        ({"replicas": {"min": 1, "max": 1, "desired": 3}}, "desired"),
    ],
)
def test_bad_placements_are_rejected_by_schema_and_model(bad: dict[str, Any], why: str) -> None:
    obj = placement()
    for key, value in bad.items():
        if value is None:
            del obj["spec"][key]
        else:
            obj["spec"][key] = value
    with pytest.raises(ValueError, match=why):
        PLACEMENTS.validate(obj)
    if why != "desired":  # the pydantic models keep unknown fields for newer CRD versions
        with pytest.raises(ValidationError):
            ModelPlacement.model_validate(obj)


def test_min_le_max_is_the_crds_cel_rule() -> None:
    replicas = served_version(load_crd("modelplacements"))["schema"]["openAPIV3Schema"]
    rules = replicas["properties"]["spec"]["properties"]["replicas"]["x-kubernetes-validations"]
    assert [rule["rule"] for rule in rules] == ["self.min <= self.max"]
    meaning = CEL_RULES["self.min <= self.max"]
    assert meaning({"min": 0, "max": 1}, None) and meaning({"min": 2, "max": 2}, None)
    assert not meaning({"min": 3, "max": 2}, None)


def test_spec_model_is_immutable_by_the_crds_cel_rule() -> None:
    spec = served_version(load_crd("modelplacements"))["schema"]["openAPIV3Schema"]
    model = spec["properties"]["spec"]["properties"]["model"]
    assert [rule["rule"] for rule in model["x-kubernetes-validations"]] == ["self == oldSelf"]
    before = PLACEMENTS.validate(placement())
    PLACEMENTS.validate({**before, "spec": {**before["spec"], "pinned": True}}, before)
    with pytest.raises(ValueError, match=r"spec\.model is immutable"):
        PLACEMENTS.validate({**before, "spec": {**before["spec"], "model": "other"}}, before)


def test_unknown_phases_are_rejected() -> None:
    obj = placement()
    obj["status"] = {"phase": "Sleeping"}
    with pytest.raises(ValueError, match="phase"):
        PLACEMENTS.validate(obj)
    with pytest.raises(ValidationError):
        ModelPlacementStatus.model_validate({"phase": "Sleeping"})
    neuron = {"kind": "Neuron", "metadata": {"name": "n"}, "spec": {}, "status": {"phase": "Gone"}}
    with pytest.raises(ValueError, match="phase"):
        NEURONS.validate(neuron)
    with pytest.raises(ValidationError):
        NeuronResourceStatus.model_validate({"phase": "Gone"})


def test_a_full_status_written_by_the_models_passes_the_schema() -> None:
    condition = {
        "type": "Scheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "no healthy, uncordoned neuron matches the selector gpu=a100",
        "lastTransitionTime": "2026-12-01T21:00:00Z",
        "observedGeneration": 1,
    }
    status = ModelPlacementStatus.model_validate(
        {
            "phase": "Degraded",
            "replicas": [
                {
                    "neuron": "n1",
                    "endpoint": "http://n1",
                    "state": "ready",
                    "since": "2026-12-01T21:00:00Z",
                }
            ],
            "readyReplicas": 1,
            "conditions": [condition],
            "observedGeneration": 1,
        }
    )
    obj = placement()
    obj["status"] = status.wire()
    PLACEMENTS.validate(obj)
    neuron_status = NeuronResourceStatus.model_validate(
        {
            "phase": "Ready",
            "endpoint": "http://n1:13131",
            "memoryFree": "7.5Gi",
            "devices": [
                {"id": "cpu-0", "name": "cpu", "memoryTotal": 8, "memoryFree": 4, "healthy": True}
            ],
            "models": [
                {
                    "model": "m",
                    "state": "ready",
                    "memory": 4,
                    "inFlight": 0,
                    "lastUsed": None,
                    "devices": ["cpu-0"],
                    "error": None,
                }
            ],
            "lastProbe": "2026-12-01T21:00:00Z",
            "conditions": [
                {**condition, "type": "Reachable", "status": "True", "reason": "Probed"}
            ],
        }
    )
    neuron = {
        "kind": "Neuron",
        "metadata": {"name": "n1"},
        "spec": {},
        "status": neuron_status.wire(),
    }
    NEURONS.validate(neuron)
    with_nulls = copy.deepcopy(neuron)
    with_nulls["status"]["models"][0]["lastUsed"] = None
    NEURONS.validate(with_nulls)


def test_a_bad_condition_reason_is_rejected() -> None:
    obj = placement()
    obj["status"] = {
        "conditions": [
            {
                "type": "Loaded",
                "status": "False",
                "reason": "load failed",
                "message": "",
                "lastTransitionTime": "2026-12-01T21:00:00Z",
            }
        ]
    }
    with pytest.raises(ValueError, match="reason"):
        PLACEMENTS.validate(obj)


def test_demand_annotation_round_trips_and_ignores_garbage() -> None:
    demand = PlacementDemand(at="2026-12-01T21:00:00Z", waiting=3)
    annotations = demand.annotation()
    assert list(annotations) == [DEMAND_ANNOTATION]
    assert PlacementDemand.from_annotations(annotations) == demand
    assert PlacementDemand.from_annotations({DEMAND_ANNOTATION: "{not json"}) is None
    assert PlacementDemand.from_annotations({}) is None


def test_crds_are_namespaced_in_the_cortex_category_with_short_names() -> None:
    for name, short in (("neurons", "nr"), ("modelplacements", "mp")):
        crd = load_crd(name)
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["categories"] == ["cortex"]
        assert crd["spec"]["names"]["shortNames"] == [short]
        assert "status" in served_version(crd)["subresources"]
    peering = load_crd("kopfpeerings")
    assert (peering["spec"]["group"], peering["spec"]["scope"]) == ("kopf.dev", "Namespaced")


@pytest.mark.parametrize("name", ["neurons", "modelplacements"])
def test_printer_columns_point_at_fields_the_schema_has(name: str) -> None:
    version = served_version(load_crd(name))
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].lstrip(".").replace("[*]", "").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            node = node.get("items", node)  # a list's elements
            assert part in node.get("properties", {}), f"{column['name']}: no {part} in {path}"
            node = node["properties"][part]
