"""The kopf handlers, thin: parse the object into its model, call the controller or a pure function,
write the result through kopf's `patch`. Registered on a registry of their own, so one process
(or one test) can run several operators one after another."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from cortex.core.resources import (
    DEMAND_ANNOTATION,
    GROUP,
    NEURONS,
    PLACEMENTS,
    VERSION,
    ModelPlacement,
    ModelPlacementStatus,
    Neuron,
)
from cortex.operator import kube
from cortex.operator.config import NEURON_PORT
from cortex.operator.controller import Controller, body_of
from cortex.operator.neurons import neuron_drift, neuron_for_pod, user_marks, with_marks
from cortex.operator.placement_status import placement_status
from cortex.operator.probing import Prober
from cortex.operator.reconcile import Fleet

log = logging.getLogger(__name__)
Index = Mapping[str, Any]  # kopf index: namespace -> store of parsed objects
# How long a deleted Neuron's cordon waits for the Neuron made for the node's next neuron pod.
CORDON_MEMORY = 600.0


def build_registry(controller: Controller, *, login: bool = True) -> kopf.OperatorRegistry:
    """Every handler of the operator, bound to `controller`."""
    registry = kopf.OperatorRegistry()
    config = controller.config
    if login:
        kopf.on.login(registry=registry)(cluster_login)

    @kopf.index(GROUP, VERSION, NEURONS, id="neuron_index", registry=registry)
    def neuron_index(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Neuron]:
        neuron = _parse(Neuron, body)
        return {namespace: neuron} if neuron is not None else {}

    @kopf.index(GROUP, VERSION, PLACEMENTS, id="placement_index", registry=registry)
    def placement_index(namespace: str, body: kopf.Body, **_: Any) -> dict[str, ModelPlacement]:
        placement = _parse(ModelPlacement, body)
        return {namespace: placement} if placement is not None else {}

    # Timers tick, and failed handlers are retried, once a probe interval (not kopf's minute).
    every = config.probe_interval
    prober: Prober | None = None

    @kopf.on.startup(registry=registry)
    async def start_probing(neuron_index: Index, **_: Any) -> None:
        """Probe the Neurons from a task of this process (probing.py says why not a timer)."""
        nonlocal prober
        prober = Prober(controller, neuron_index)
        controller.spawn(prober.run())

    async def reconcile(
        body: kopf.Body, namespace: str, patch: kopf.Patch, neurons: Index, placements: Index
    ) -> None:
        placement = ModelPlacement.model_validate(body)
        if placement.metadata.deletion_timestamp:
            return

        def objects() -> tuple[list[Neuron], list[ModelPlacement]]:
            """The indexes as they are when the namespace's lock is ours. kopf indexes an event
            before its handlers run, so they hold this body or a newer one."""
            found = list(placements.get(namespace, []))
            if all(p.metadata.name != placement.metadata.name for p in found):
                found.append(placement)
            return list(neurons.get(namespace, [])), found

        result = await controller.reconcile(namespace, objects)
        if result is None:
            return  # some neuron has not answered its first probe yet
        fleet, planned = result
        status = placement_status(placement, fleet, planned, controller.clock())
        _report_lost(placement, status, fleet)
        wire = status.wire()
        current = dict(body.get("status") or {})
        if {key: current.get(key) for key in wire} != wire:
            patch.status.update(wire)
        if status.ready_replicas and DEMAND_ANNOTATION in placement.metadata.annotations:
            patch.metadata.annotations[DEMAND_ANNOTATION] = None  # the demand is served

    @kopf.timer(GROUP, VERSION, PLACEMENTS, interval=every, backoff=every, registry=registry)
    async def placement_timer(
        body: kopf.Body, namespace: str, patch: kopf.Patch,
        neuron_index: Index, placement_index: Index, **_: Any,
    ) -> None:  # fmt: skip
        """Reconcile on a clock too: probes change the fleet without touching the placement."""
        await reconcile(body, namespace, patch, neuron_index, placement_index)

    @kopf.on.event(GROUP, VERSION, PLACEMENTS, registry=registry)
    async def placement_changed(
        type: str, body: kopf.Body, namespace: str, patch: kopf.Patch,
        neuron_index: Index, placement_index: Index, **_: Any,
    ) -> None:  # fmt: skip
        """Reconcile as soon as a placement is created or changed (spec, demand annotation)."""
        if type != "DELETED":
            await reconcile(body, namespace, patch, neuron_index, placement_index)

    @kopf.on.delete(GROUP, VERSION, PLACEMENTS, backoff=every, registry=registry)
    async def placement_deleted(
        body: kopf.Body, namespace: str, neuron_index: Index, placement_index: Index, **_: Any
    ) -> None:
        """The finalizer: unload the model everywhere before the placement goes."""
        placement = _parse(ModelPlacement, body)
        if placement is None:
            # Never placed (the operator could not read it), so nothing to unload: let it go.
            message = "not a placement the operator can read; released without unloading"
            kopf.warn(body, reason="Invalid", message=message)
            return
        neurons = list(neuron_index.get(namespace, []))
        placements = list(placement_index.get(namespace, []))
        busy = await controller.unload_everywhere(namespace, placement, neurons, placements)
        if busy:
            raise kopf.TemporaryError(
                f"still loaded: {', '.join(busy)}", delay=config.probe_interval
            )

    # What users set on Neurons when last seen (a cordon, labels): a Neuron goes with its pod,
    # and the one made for the node's next pod (a rollout, a restart) keeps it, if it comes
    # within CORDON_MEMORY (a node name reused much later starts afresh). Kept by this process
    # only. -> (user_marks, when its Neuron went; None: it is)
    kept: dict[tuple[str, str], tuple[dict[str, Any], float | None]] = {}

    def remembered(namespace: str, wanted: dict[str, Any]) -> dict[str, Any]:
        key = (namespace, wanted["metadata"]["name"])
        if key not in kept:
            return wanted
        marks, gone = kept[key]
        if gone is not None and controller.clock() - gone > CORDON_MEMORY:
            del kept[key]
            return wanted
        return with_marks(wanted, marks)

    @kopf.index("", "v1", "pods", labels=config.neuron_selector, id="pod_index", registry=registry)
    def pod_index(namespace: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        """(namespace, node) -> the Neuron a live neuron pod stands for."""
        wanted = neuron_for_pod(body, NEURON_PORT)
        return {(namespace, wanted["metadata"]["name"]): wanted} if wanted is not None else {}

    @kopf.on.event("", "v1", "pods", labels=config.neuron_selector, registry=registry)
    async def neuron_pod(
        type: str, body: kopf.Body, namespace: str, neuron_index: Index, **_: Any
    ) -> None:
        """A neuron pod stands for a Neuron named after its node; create or correct it."""
        if type == "DELETED":
            return  # the Neuron is owned by the pod: Kubernetes collects it
        wanted = neuron_for_pod(body, NEURON_PORT)
        if wanted is None:
            return
        name = wanted["metadata"]["name"]
        existing = next(
            (n for n in neuron_index.get(namespace, []) if n.metadata.name == name), None
        )
        if existing is None:
            await kube.create_neuron(controller.settings, namespace, remembered(namespace, wanted))
        elif existing.metadata.deletion_timestamp:
            return  # going (its old pod's garbage collection): made again once gone
        elif (drift := neuron_drift(existing, wanted)) is not None:
            await kube.patch_neuron(controller.settings, namespace, name, drift)

    @kopf.on.event(GROUP, VERSION, NEURONS, registry=registry)
    async def neuron_event(
        type: str, body: kopf.Body, name: str, namespace: str, pod_index: Index, **_: Any
    ) -> None:
        """A new Neuron is probed at once; one deleted while its node still runs a neuron pod is
        made again for that pod. Its cordon and labels are remembered across the two."""
        key = (namespace, name)
        if type != "DELETED":
            if prober is not None:
                prober.notice(namespace, name)
            if marks := user_marks(body):
                kept[key] = (marks, None)
            else:
                kept.pop(key, None)
            return
        if prober is not None:
            prober.forget(namespace, name)
        if key in kept:
            kept[key] = (kept[key][0], controller.clock())
        for wanted in pod_index.get((namespace, name), []):
            await kube.create_neuron(controller.settings, namespace, remembered(namespace, wanted))
            return

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await controller.aclose()

    return registry


def cluster_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In the cluster, the pod's service account; outside it, the kubeconfig (KUBECONFIG or
    ~/.kube/config), through the official client when it is installed (exec plugins, OIDC)."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


def _parse(model: type[Neuron] | type[ModelPlacement], body: kopf.Body) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        log.warning("ignoring %s %s: %s", body.get("kind"), body.metadata.name, exc)
        return None


def _report_lost(placement: ModelPlacement, status: ModelPlacementStatus, fleet: Fleet) -> None:
    """An Event for each replica that vanished because its neuron stopped answering."""
    kept = {r.neuron for r in status.replicas}
    for replica in placement.status.replicas if placement.status else []:
        probe = fleet.probes.get(replica.neuron)
        if (
            replica.neuron not in kept
            and probe is not None
            and not probe.reachable(fleet.unreachable_after)
        ):
            kopf.warn(
                body_of(placement),
                reason="ReplicaLost",
                message=f"{replica.neuron} stopped answering; its replica is rescheduled",
            )
