"""A Kubernetes API for tests: kmock's emulator with the project's CRDs (crds/*.yaml) registered,
defaults applied and every create or patch of their objects validated against their schemas, as an
API server with strict field validation would."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import yaml
from kmock._internal import dicts, enums, parsing, rendering

CRDS = Path(__file__).resolve().parents[2] / "crds"


def load_crd(name: str) -> dict[str, Any]:
    """crds/<name>.yaml as a dict."""
    crd: dict[str, Any] = yaml.safe_load((CRDS / f"{name}.yaml").read_text())
    return crd


def served_version(crd: Mapping[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = crd["spec"]["versions"][0]
    return version


# The CEL rules the CRDs carry, and what each means, checked with plain Python on the new value
# and the stored one (None on create, where a rule naming oldSelf is not evaluated). A new rule
# fails validation here until its meaning is written down next to it.
CEL_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "self.min <= self.max": lambda value, _: value["min"] <= value["max"],
    "self == oldSelf": lambda value, old: value == old,
}


def _json_schema(node: Any, *, strict: bool) -> Any:
    """openAPIV3Schema -> JSON Schema: `nullable` becomes a null type; with `strict`, objects with
    named properties refuse others (strict field validation) unless they preserve unknown fields."""
    if isinstance(node, list):
        return [_json_schema(item, strict=strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _json_schema(value, strict=strict) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if strict and "properties" in node and not preserve and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


class CrdValidator:
    """Defaults and validation of one CRD's objects."""

    def __init__(self, crd: Mapping[str, Any]) -> None:
        self.crd = crd
        self.kind = crd["spec"]["names"]["kind"]
        self.schema = served_version(crd)["schema"]["openAPIV3Schema"]
        checked = _json_schema(self.schema, strict=True)
        checked.setdefault("properties", {}).update(
            apiVersion={"type": "string"},
            kind={"type": "string", "const": self.kind},
            metadata={"type": "object"},
        )
        self.validator = jsonschema.Draft202012Validator(checked)

    def defaulted(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The object with the schema's defaults filled in (as the API server stores it)."""
        result = copy.deepcopy(dict(obj))
        _apply_defaults(self.schema, result)
        return result

    def errors(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
        """Why the (defaulted) object would be rejected (`old`: the stored one, for an update);
        empty when it is valid."""
        found = [
            f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in self.validator.iter_errors(obj)
        ]
        if not found:
            found = _cel_errors(self.schema, obj, old, "")
        return found

    def validate(
        self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The defaulted object, or ValueError naming every problem."""
        result = self.defaulted(obj)
        problems = self.errors(result, old)
        if problems:
            raise ValueError(f"{self.kind} rejected: " + "; ".join(problems))
        return result


def _apply_defaults(schema: Mapping[str, Any], value: Any) -> None:
    if not isinstance(value, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            _apply_defaults(sub, value[key])
            if sub.get("type") == "array" and isinstance(value[key], list):
                for item in value[key]:
                    _apply_defaults(sub.get("items", {}), item)


def _cel_errors(schema: Mapping[str, Any], value: Any, old: Any, path: str) -> list[str]:
    found = []
    for check in schema.get("x-kubernetes-validations", []):
        meaning = CEL_RULES.get(check["rule"])
        if meaning is None:
            raise NotImplementedError(f"CEL rule {check['rule']!r} has no meaning in CEL_RULES")
        if old is None and "oldSelf" in check["rule"]:
            continue  # a transition rule: only an update has an old value
        if not meaning(value, old):
            found.append(f"{path or '<root>'}: {check.get('message', check['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                before = old.get(key) if isinstance(old, dict) else None
                found += _cel_errors(sub, value[key], before, f"{path}.{key}".lstrip("."))
    return found


# -- the emulator


def resource_key(crd: Mapping[str, Any]) -> str:
    """'cortex.helexa.ai/v1alpha1/neurons' for kmock's resource registry."""
    spec = crd["spec"]
    return f"{spec['group']}/{served_version(crd)['name']}/{spec['names']['plural']}"


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespaced path with nothing after the
    namespace and fails with a 500; kopf lists namespaces, so read those as the namespaces
    resource itself."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _kmock_parse_path(path)


_kmock_parse_path = parsing.parse_path
parsing.parse_path = _parse_path


class CortexCluster(kmock.KubernetesEmulator):
    """kmock's emulator serving the project's CRDs plus what kopf needs to start its watchers."""

    validators: dict[str, CrdValidator]

    def register(
        self,
        names: tuple[str, ...] = ("neurons", "modelplacements", "kopfpeerings"),
        *,
        namespaces: tuple[str, ...] = (),
    ) -> None:
        """Declare the built-in resources kopf discovers, our CRDs from their manifests, and
        create `namespaces`."""
        self.validators = {}
        verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        for builtin, kind in (
            ("v1/namespaces", "Namespace"),
            ("v1/events", "Event"),
            ("v1/pods", "Pod"),
            ("v1/configmaps", "ConfigMap"),
        ):
            self.resources[builtin] = kmock.ResourceInfo(
                kind=kind, namespaced=kind != "Namespace", verbs=verbs
            )
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", namespaced=False, verbs=verbs
        )
        for name in names:
            crd = load_crd(name)
            key = resource_key(crd)
            names_ = crd["spec"]["names"]
            version = served_version(crd)
            self.resources[key] = kmock.ResourceInfo(
                kind=names_["kind"],
                singular=names_.get("singular"),
                namespaced=crd["spec"]["scope"] == "Namespaced",
                shortnames=set(names_.get("shortNames", [])),
                categories=set(names_.get("categories", [])),
                subresources=set(version.get("subresources", {})),
                verbs=verbs,
            )
            self.validators[key] = CrdValidator(crd)
        for namespace in namespaces:
            self.objects["v1/namespaces", None, namespace] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace},
            }

    async def _handle(self, request: rendering.Request) -> Any:
        """Validate our CRDs' objects before the emulator stores them; reject like an API server.
        Names from metadata.generateName (kopf names its Events that way), a uid, a
        resourceVersion and a creationTimestamp (whole seconds) are given to new objects as an API
        server gives them (kopf's finalizer
        patches test the resourceVersion). Unlike a server, writes keep the resourceVersion: kmock
        would answer a failed version test with a 500, which kopf retries unchanged."""
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            self.versions = getattr(self, "versions", 0) + 1
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("resourceVersion", str(self.versions))
            meta.setdefault("uid", f"uid-{self.versions:06d}")
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if not meta.get("name") and meta.get("generateName"):
                self.generated = getattr(self, "generated", 0) + 1
                meta["name"] = f"{meta['generateName']}{self.generated:05d}"
        if request.resource is not None:
            key = f"{request.resource.group}/{request.resource.version}/{request.resource.plural}"
            if key == "/v1/configmaps" and request.action == enums.action.UPDATE:
                conflict = self._versioned_write(request, key)
                if conflict is not None:
                    return await self._render_error(conflict)
            validator = getattr(self, "validators", {}).get(key)
            if validator is not None:
                try:
                    self._check(request, key, validator)
                except ValueError as exc:
                    return await self._render_error(
                        kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
                    )
        return await super()._handle(request)

    def _versioned_write(
        self, request: rendering.Request, key: str
    ) -> kmock.KubernetesError | None:
        """A ConfigMap write as an API server takes it: a resourceVersion in the write must be
        the stored one (else 409 Conflict), and the write gives the object a new one."""
        where = (kmock.resource(key), request.namespace, request.name)
        if where not in self.objects or not isinstance(request.data, dict):
            return None
        stored = self.objects[where].raw.get("metadata", {}).get("resourceVersion")
        meta = request.data.setdefault("metadata", {})
        if meta.get("resourceVersion") not in (None, stored):
            return kmock.KubernetesError(status=409, reason="Conflict", message="changed since")
        self.versions = getattr(self, "versions", 0) + 1
        meta["resourceVersion"] = str(self.versions)
        return None

    def _check(self, request: rendering.Request, key: str, validator: CrdValidator) -> None:
        """Validate the write, and keep metadata.generation as a server does for custom
        resources: 1 on create, one more on each write that changes the spec (status and
        metadata writes leave it)."""
        if request.action == enums.action.CREATE:
            stored = validator.validate(request.data)
            stored.setdefault("metadata", {})["generation"] = 1
            request.data.clear()
            request.data.update(stored)
        elif request.action == enums.action.UPDATE and request.name is not None:
            where = (kmock.resource(key), request.namespace, request.name)
            if where not in self.objects or self.objects[where].deleted:
                return
            current = self.objects[where]
            patched = dicts.patch_dict(current.raw, request.data)
            validator.validate(patched, current.raw)
            if patched.get("spec") != current.raw.get("spec"):
                generation = current.raw.get("metadata", {}).get("generation") or 0
                request.data.setdefault("metadata", {})["generation"] = generation + 1
