"""Neurons as the operator sees them: a probe of a neuron's own /status, the Neuron object's status
written from it, and the Neuron object a neuron pod stands for. Pure functions; probing is in
controller.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cortex.core.fleet import NeuronStatus
from cortex.core.resources import (
    API_VERSION,
    HOSTNAME_LABEL,
    Neuron,
    NeuronDevice,
    NeuronModel,
    NeuronPhase,
    NeuronResourceStatus,
    rfc3339,
)
from cortex.operator.conditions import set_condition


@dataclass(frozen=True)
class Probe:
    """The last answer of one neuron: its /status, or why it gave none."""

    endpoint: str
    at: float
    status: NeuronStatus | None = None
    error: str | None = None
    failures: int = 0  # consecutive failed probes

    def reachable(self, unreachable_after: int) -> bool:
        return self.status is not None and self.failures < unreachable_after


def quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity a person reads at a glance (7.5Gi, 512Mi)."""
    for unit, scale in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(size)


def neuron_phase(neuron: Neuron, probe: Probe | None, unreachable_after: int) -> NeuronPhase:
    if probe is None:
        return "Pending"
    if probe.failures >= unreachable_after:
        return "Unreachable"
    if probe.status is None or not probe.status.healthy:
        return "Pending"  # no answer yet, or it answers but serves nothing (draining, no device)
    return "Cordoned" if neuron.spec.cordoned else "Ready"


def neuron_status(
    neuron: Neuron, probe: Probe | None, unreachable_after: int, now: float
) -> NeuronResourceStatus:
    """The Neuron object's status after a probe (or without one: no endpoint yet), with the
    comma-joined summaries of its devices and models that `kubectl get nr` shows."""
    status = _probed_status(neuron, probe, unreachable_after, now)
    status.device_summary = ",".join(d.id for d in status.devices)
    status.model_summary = ",".join(m.model for m in status.models)
    return status


def _probed_status(
    neuron: Neuron, probe: Probe | None, unreachable_after: int, now: float
) -> NeuronResourceStatus:
    previous = neuron.status or NeuronResourceStatus()
    phase = neuron_phase(neuron, probe, unreachable_after)
    status = previous.model_copy(
        update={"phase": phase, "observed_generation": neuron.metadata.generation}
    )
    if probe is None:
        status.conditions = set_condition(
            previous.conditions, "Reachable", "Unknown", "NoEndpoint",
            "spec.endpoint is not set", now, neuron.metadata.generation,
        )  # fmt: skip
        status.models = []  # what it holds is unknown, and out of the fleet, without an endpoint
        return status
    status.endpoint = probe.endpoint
    status.last_probe = rfc3339(probe.at)
    if probe.status is None or probe.failures:
        lost = phase == "Unreachable"
        message = f"{probe.failures} failed probe(s) in a row: {probe.error}"
        status.conditions = set_condition(
            previous.conditions, "Reachable", "False" if lost else "Unknown", "ProbeFailed",
            message, now, neuron.metadata.generation,
        )  # fmt: skip
        if lost:
            status.models = []  # what it held is lost to the fleet until it answers again
        return status
    answer = probe.status
    status.devices = [
        NeuronDevice(
            id=d.id,
            name=d.name,
            memory_total=d.memory_total,
            memory_free=d.memory_free,
            healthy=d.healthy,
        )
        for d in answer.devices
    ]
    status.memory_free = quantity(sum(d.memory_free for d in answer.devices if d.healthy))
    status.models = [
        NeuronModel(
            model=m.id,
            state=m.state.value,
            memory=m.memory_bytes,
            in_flight=m.in_flight,
            last_used=rfc3339(m.last_used) if m.last_used is not None else None,
            devices=list(m.devices),
            error=m.error,
        )
        for m in answer.models
    ]
    conditions = set_condition(
        previous.conditions, "Reachable", "True", "Probed", f"{answer.node} answers", now,
        neuron.metadata.generation,
    )  # fmt: skip
    status.conditions = set_condition(conditions, *_health(answer), now, neuron.metadata.generation)
    return status


def _health(answer: NeuronStatus) -> tuple[str, Literal["True", "False"], str, str]:
    """The Healthy condition: a neuron that answers unhealthy takes no requests."""
    if answer.healthy:
        return ("Healthy", "True", "Healthy", "serving")
    if any(d.healthy for d in answer.devices):
        return ("Healthy", "False", "ShuttingDown", "shutting down: takes no new requests")
    return ("Healthy", "False", "NoHealthyDevice", "no healthy device: takes no requests")


# -- neuron pods


def pod_endpoint(pod: Mapping[str, Any], default_port: int) -> str | None:
    """http://<pod IP>:<port named http>, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers", []):
        for entry in container.get("ports", []) or []:
            if entry.get("name") == "http" and entry.get("containerPort"):
                port = int(entry["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


MANAGED_BY = {"app.kubernetes.io/managed-by": "cortex-operator"}


def neuron_for_pod(pod: Mapping[str, Any], default_port: int) -> dict[str, Any] | None:
    """The Neuron object a scheduled, addressed neuron pod stands for: named after its node,
    owned by the pod (so it goes with it). None while the pod is unscheduled or has no IP."""
    meta = pod.get("metadata") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    endpoint = pod_endpoint(pod, default_port)
    if not node or endpoint is None or meta.get("deletionTimestamp"):
        return None
    owner = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Neuron",
        "metadata": {
            "name": node,
            "namespace": meta.get("namespace"),
            "labels": dict(MANAGED_BY),
            "ownerReferences": [owner],
        },
        "spec": {"endpoint": endpoint, "labels": {HOSTNAME_LABEL: node}},
    }


def user_marks(neuron: Mapping[str, Any]) -> dict[str, Any]:
    """What a user set on a Neuron that the one made for its node's next pod keeps: the cordon
    and the labels (`kubectl label`, spec.labels) the operator did not write. Empty if none."""
    meta, spec = neuron.get("metadata") or {}, neuron.get("spec") or {}
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in MANAGED_BY}
    spec_labels = {k: v for k, v in (spec.get("labels") or {}).items() if k != HOSTNAME_LABEL}
    marks: dict[str, Any] = {}
    if labels:
        marks["metadata"] = {"labels": labels}
    if spec.get("cordoned"):
        marks.setdefault("spec", {})["cordoned"] = True
    if spec_labels:
        marks.setdefault("spec", {})["labels"] = spec_labels
    return marks


def with_marks(wanted: dict[str, Any], marks: Mapping[str, Any]) -> dict[str, Any]:
    """A pod's Neuron with a predecessor's user_marks; the operator's own labels win."""
    meta, spec = marks.get("metadata", {}), marks.get("spec", {})
    labels = {**meta.get("labels", {}), **wanted["metadata"]["labels"]}
    spec_labels = {**spec.get("labels", {}), **wanted["spec"]["labels"]}
    return {
        **wanted,
        "metadata": {**wanted["metadata"], "labels": labels},
        "spec": {**wanted["spec"], **spec, "labels": spec_labels},
    }


def neuron_drift(existing: Neuron, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings an existing Neuron in line with its pod; None when it is."""
    spec = wanted["spec"]
    patch: dict[str, Any] = {}
    if existing.spec.endpoint != spec["endpoint"]:
        patch.setdefault("spec", {})["endpoint"] = spec["endpoint"]
    if any(existing.spec.labels.get(k) != v for k, v in spec["labels"].items()):
        patch.setdefault("spec", {})["labels"] = {**existing.spec.labels, **spec["labels"]}
    owners = (
        existing.metadata.model_extra.get("ownerReferences")
        if existing.metadata.model_extra
        else None
    )
    if owners != wanted["metadata"]["ownerReferences"]:
        patch["metadata"] = {"ownerReferences": wanted["metadata"]["ownerReferences"]}
    return patch or None
