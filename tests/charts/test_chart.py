"""charts/cortex through the real helm: it lints and renders for each kind of install, renders the
objects a cluster needs, and rejects a misspelt value with a message that names it."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from rendered import CHART, Render, find, run_helm

INSTALLS = {
    "gpu": [],
    "cpu": ["-f", str(CHART / "values-cpu.yaml")],
    "monitoring": ["--set", "serviceMonitor.enabled=true,grafanaDashboard.enabled=true"],
    "existing-secrets": [
        "--set",
        "adminToken.existingSecret=my-admin,gateway.auth.existingSecret=my-keys",
    ],
    "peered-operator": ["--set", "operator.replicas=3"],
}

# Values whose insides are Kubernetes objects or lists of items, documented as a whole.
OPAQUE = {"resources", "tolerations", "affinity", "keys", "placements", "metricsFrom", "config"}

ALWAYS = {
    "ServiceAccount": 3,
    "Role": 2,
    "RoleBinding": 2,
    "ClusterRole": 1,
    "ClusterRoleBinding": 1,
    "ConfigMap": 2,
    "Deployment": 2,
    "DaemonSet": 1,
    "Service": 3,
    "NetworkPolicy": 1,
}


@pytest.mark.parametrize("install", INSTALLS)
def test_lint_is_clean(helm: Path, install: str) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), *INSTALLS[install])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("install", "extra"),
    [
        ("gpu", {"Secret": 2}),
        ("cpu", {"Secret": 2, "ModelPlacement": 1}),
        ("monitoring", {"Secret": 2, "ServiceMonitor": 2, "PodMonitor": 1, "ConfigMap": 1}),
        ("existing-secrets", {}),
        ("peered-operator", {"Secret": 2, "KopfPeering": 1}),
    ],
)
def test_each_install_renders_the_objects_it_needs(
    render: Render, install: str, extra: dict[str, int]
) -> None:
    kinds = Counter(o["kind"] for o in render(*INSTALLS[install]))
    assert kinds == Counter(ALWAYS) + Counter(extra)


def test_optional_parts_switch_off(render: Render) -> None:
    kinds = {
        o["kind"]
        for o in render(
            "--set", "operator.enabled=false,neuron.enabled=false,networkPolicy.enabled=false"
        )
    }
    assert "DaemonSet" not in kinds and "NetworkPolicy" not in kinds
    assert kinds >= {"Deployment", "Service"}  # the gateway stays
    names = {o["metadata"]["name"] for o in render("--set", "operator.enabled=false")}
    assert not any("operator" in name for name in names)


def test_example_placements_render_when_asked(render: Render) -> None:
    placements = [
        o
        for o in render("--set", "examplePlacements.enabled=true")
        if o["kind"] == "ModelPlacement"
    ]
    assert {p["metadata"]["name"] for p in placements} == {
        "smollm2-135m-instruct",
        "all-minilm-l6-v2",
    }
    assert all(p["apiVersion"] == "cortex.helexa.ai/v1alpha1" for p in placements)
    assert all(
        p["metadata"]["labels"]["app.kubernetes.io/instance"] == "cortex" for p in placements
    )


def test_example_placements_outlive_the_operator_instead_of_hanging(helm: Path) -> None:
    """helm uninstall deletes the operator (and its RBAC) with everything else: a placement it
    deleted too would wait in Terminating for a finalizer nobody runs. helm leaves them, and the
    notes say how to delete them while the operator still runs."""
    args = ["--dry-run=client", "--set", "examplePlacements.enabled=true"]
    done = run_helm(helm, "install", "cortex", str(CHART), "-n", "ai", *args)
    assert done.returncode == 0, done.stderr
    manifest, notes = done.stdout.split("NOTES:", 1)
    placements = [
        o for o in yaml.safe_load_all(manifest) if o and o.get("kind") == "ModelPlacement"
    ]
    assert len(placements) == 2
    for placement in placements:
        assert placement["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    delete = "kubectl -n ai delete modelplacements smollm2-135m-instruct all-minilm-l6-v2"
    assert delete in notes


def test_object_names_follow_the_release(render: Render) -> None:
    names = {o["metadata"]["name"] for o in render(release="prod", namespace="llm")}
    assert {"prod-cortex-gateway", "prod-cortex-neuron", "prod-cortex-operator"} <= names
    # Cluster-scoped names carry the namespace: two releases of one name never collide.
    assert "prod-cortex-llm-operator" in names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "gateway.replica=2"],
            "at '/gateway': additional properties 'replica' not allowed",
        ),
        (["--set", "serviceMonitor.enable=true"], "additional properties 'enable' not allowed"),
        (["--set", "neuron.gpu.count=0"], "at '/neuron/gpu/count': minimum: got 0, want 1"),
        (["--set", "neuron.modelCache.type=pvc"], "at '/neuron/modelCache/type'"),
        (["--set", "neuron.config.port=1"], "invalid propertyName 'port'"),
        (
            ["--set", "neuron.config.kv_token=8192"],
            "at '/neuron/config': additional properties 'kv_token' not allowed",
        ),
        (
            ["--set", "neuron.config.shutdown_grace=5"],
            "at '/neuron/config/shutdown_grace': value must be 'set neuron.shutdownGraceSeconds",
        ),
        (["--set", "gateway.loadTimeout=soon"], "at '/gateway/loadTimeout'"),
        (["--set", "serviceMonitor.interval=1.5m"], "at '/serviceMonitor/interval'"),
        (["--set", "gateway.preStopSeconds=-1"], "at '/gateway/preStopSeconds': minimum"),
    ],
)
def test_a_bad_value_fails_with_a_message_naming_it(
    helm: Path, args: list[str], message: str
) -> None:
    done = run_helm(helm, "template", "cortex", str(CHART), *args)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert message in done.stderr, done.stderr


def test_a_typo_in_a_values_file_fails_too(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("neuron:\n  nodeSelecter: {pool: gpu}\n")
    done = run_helm(helm, "install", "cortex", str(CHART), "--dry-run=client", "-f", str(values))
    assert done.returncode != 0
    assert "at '/neuron': additional properties 'nodeSelecter' not allowed" in done.stderr


def test_every_value_has_a_comment() -> None:
    """values.yaml is the reference: every key has a comment right above it. The insides of a
    value that is a Kubernetes object or a list (resources, tolerations, placements) are that
    value's own, covered by its comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    opaque_below: int | None = None  # indent under which lines belong to an opaque value
    for number, line in enumerate(lines):
        match = re.match(r"^( *)(- )?([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match[1])
        if opaque_below is not None:
            if indent > opaque_below or match[2]:
                continue
            opaque_below = None
        if match[3] in OPAQUE or not match[4].strip():
            opaque_below = indent if match[3] in OPAQUE else None
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            undocumented.append(f"line {number + 1}: {line.strip()}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_values_files_only_set_keys_the_defaults_have() -> None:
    """values-cpu.yaml is an overlay: a key it invents would be caught by the schema, but a key
    the defaults lack would mean values.yaml is missing its documentation."""

    def keys(tree: object, prefix: str = "") -> set[str]:
        if not isinstance(tree, dict):
            return set()
        found = set()
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            if not path.startswith(("neuron.config", "neuron.resources", "examplePlacements")):
                found |= keys(value, path)
        return found

    defaults = keys(yaml.safe_load((CHART / "values.yaml").read_text()))
    overlay = keys(yaml.safe_load((CHART / "values-cpu.yaml").read_text()))
    assert overlay <= defaults, overlay - defaults


def test_secrets_are_generated_and_referenced(render: Render) -> None:
    objects = render()
    admin = find(objects, "Secret", "cortex-admin-token")
    keys = find(objects, "Secret", "cortex-api-keys")
    assert set(admin["data"]) == {"token"} and set(keys["data"]) == {"default"}
    existing = render(*INSTALLS["existing-secrets"])
    assert not [o for o in existing if o["kind"] == "Secret"]
    text = yaml.safe_dump_all(existing)
    assert "my-admin" in text and "my-keys" in text
    assert "cortex-admin-token" not in text and "cortex-api-keys" not in text


def test_notes_point_at_objects_the_chart_made(helm: Path) -> None:
    done = run_helm(helm, "install", "cortex", str(CHART), "-n", "ai", "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    objects = [
        o for o in yaml.safe_load_all(done.stdout.split("NOTES:", 1)[0]) if o and "kind" in o
    ]
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert "svc/cortex-gateway 31313:31313" in notes and "cortex-gateway" in services
    assert "get secret cortex-api-keys" in notes and "cortex-api-keys" in secrets
    assert "{.data.default}" in notes and "kind: ModelPlacement" in notes


def test_two_api_keys_with_one_name_fail(helm: Path) -> None:
    keys = 'gateway.auth.keys=[{"name": "ci"}, {"name": "ci", "models": ["x"]}]'
    done = run_helm(helm, "template", "cortex", str(CHART), "--set-json", keys)
    assert done.returncode != 0
    assert 'gateway.auth.keys: the name "ci" appears twice' in done.stderr


def helm_installs(markdown: Path) -> list[list[str]]:
    """The `helm install ... charts/cortex` commands of a page's sh blocks: what follows the
    chart, with paths made absolute and the namespace flags dropped."""
    text = re.sub(r"\\\n\s*", "", markdown.read_text())  # continuation lines joined
    installs = []
    for line in re.findall(r"^helm install \S+ charts/cortex(.*)$", text, re.M):
        args, kept = iter(shlex.split(line.split("#")[0])), []
        for arg in args:
            if arg == "-n":
                next(args)
            elif arg != "--create-namespace":
                kept.append(str(CHART.parents[1] / arg) if arg.startswith("charts/") else arg)
        installs.append(kept)
    return installs


def is_cpu_install(args: list[str]) -> bool:
    return any("values-cpu" in a or "neuron.gpu.enabled=false" in a for a in args)


def test_the_documented_gpu_installs_keep_the_neurons_on_gpu_nodes(render: Render) -> None:
    """A DaemonSet with no nodeSelector puts a neuron pod on every node; on a mixed cluster those
    on CPU nodes wait Pending for a GPU forever. The README shows docs/kubernetes.md's selector."""
    selectors = []
    for page in (CHART.parents[1] / "README.md", CHART.parents[1] / "docs" / "kubernetes.md"):
        gpu = [a for a in helm_installs(page) if not is_cpu_install(a)]
        assert gpu, f"{page.name}: no GPU install"
        for args in gpu:
            neuron = find(render(*args), "DaemonSet", "cortex-neuron")
            selectors.append(neuron["spec"]["template"]["spec"].get("nodeSelector"))
    assert selectors[0] and all(s == selectors[0] for s in selectors), selectors


def test_the_documented_set_only_cpu_install_is_values_cpu_yamls_neuron(render: Render) -> None:
    """docs/kubernetes.md spells values-cpu.yaml out as --set flags; the neurons must be the same
    (a memory limit without cpu_memory once let the CPU device claim half the node's RAM)."""
    page = CHART.parents[1] / "docs" / "kubernetes.md"
    (spelt,) = (a for a in helm_installs(page) if is_cpu_install(a) and "-f" not in a)
    by_file, by_flags = render("-f", str(CHART / "values-cpu.yaml")), render(*spelt)
    for kind, name in (("DaemonSet", "cortex-neuron"), ("ConfigMap", "cortex-neuron")):
        assert find(by_flags, kind, name) == find(by_file, kind, name), f"{kind} {name}"


def test_the_object_names_the_docs_give_are_the_ones_the_chart_makes(render: Render) -> None:
    """`<release>-...` in the docs, with release "cortex": a rendered object, or the spend
    ConfigMap the gateway creates under the name cortex.toml gives it."""
    objects = render()
    names = {o["metadata"]["name"] for o in objects}
    gateway_toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
    names.add(tomllib.loads(gateway_toml)["auth"]["spend_configmap"])
    repo = CHART.parents[1]
    for page in (repo / "README.md", *sorted((repo / "docs").glob("*.md"))):
        for name in re.findall(r"<release>-([a-z0-9-]*[a-z0-9])", page.read_text()):
            assert f"cortex-{name}" in names, f"{page.name}: <release>-{name}"
