"""Files the chart ships from elsewhere in the repository (the CRDs, the Grafana dashboard) are
those files, byte for byte; and the Prometheus wiring scrapes ports that exist."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rendered import CHART, REPO, Render, container, find, pod_labels, run_helm, selects

CRDS = ("kopfpeerings.yaml", "modelplacements.yaml", "neurons.yaml")
DASHBOARD = REPO / "docs" / "grafana" / "cortex.json"


def rendered_files(text: str) -> dict[str, str]:
    """helm's output split back into its source files: `---\\n# Source: <path>\\n<body>`."""
    parts = re.split(r"^---\n# Source: (\S+)\n", text, flags=re.MULTILINE)
    files: dict[str, str] = {}
    for path, body in zip(parts[1::2], parts[2::2], strict=True):
        files[path] = files.get(path, "") + body
    return files


def test_the_chart_installs_the_repositorys_crds_byte_for_byte(
    template: Callable[..., str],
) -> None:
    files = rendered_files(template("--include-crds"))
    shipped = {
        path.removeprefix("cortex/crds/"): body for path, body in files.items() if "/crds/" in path
    }
    assert sorted(shipped) == sorted(CRDS)
    for name in CRDS:
        source = (REPO / "crds" / name).read_text()
        assert shipped[name] == source + "\n", f"charts/cortex/crds/{name} differs from crds/{name}"


def test_the_chart_crds_are_the_repositorys_directory() -> None:
    """One source: the chart's crds/ is a link to the repository's, not a copy that can drift."""
    assert (CHART / "crds").is_symlink()
    assert (CHART / "crds").resolve() == (REPO / "crds").resolve()


def test_the_dashboard_configmap_is_docs_grafana_cortex_json(render: Render) -> None:
    assert not [o for o in render() if o["metadata"]["name"].endswith("grafana-dashboard")]
    objects = render(
        "--set",
        "grafanaDashboard.enabled=true,grafanaDashboard.labels.team=ml",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=cortex",
    )
    dashboard = find(objects, "ConfigMap", "cortex-grafana-dashboard")
    assert dashboard["data"] == {"cortex.json": DASHBOARD.read_text()}
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["labels"]["team"] == "ml"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "cortex"}
    assert (CHART / "dashboards" / "cortex.json").resolve() == DASHBOARD.resolve()


def service_port(service: dict[str, Any], name: str) -> dict[str, Any]:
    (port,) = (p for p in service["spec"]["ports"] if p["name"] == name)
    return port


def test_service_monitors_scrape_the_metrics_ports(render: Render) -> None:
    assert not [o for o in render() if o["kind"] == "ServiceMonitor"]
    objects = render("--set", "serviceMonitor.enabled=true,serviceMonitor.labels.release=kube-prom")
    for component, port, workload_kind in (
        ("gateway", "metrics", "Deployment"),
        ("neuron", "http", "DaemonSet"),
    ):
        monitor = find(objects, "ServiceMonitor", f"cortex-{component}")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prom"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == (port, "/metrics")
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ai"]}
        services = [
            o
            for o in objects
            if o["kind"] == "Service"
            and selects(monitor["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
        ]
        (service,) = services  # exactly one Service, hence one scrape job per component
        # The job: the Service's jobLabel label, else its name (the Prometheus Operator's rule);
        # the dashboard's default jobs for release "cortex".
        job_label = monitor["spec"].get("jobLabel", "")
        job = service["metadata"]["labels"].get(job_label, service["metadata"]["name"])
        assert job == f"cortex-{component}"
        workload = find(objects, workload_kind, f"cortex-{component}")
        assert selects(service["spec"]["selector"], pod_labels(workload))
        target = service_port(service, port)["targetPort"]
        pod_ports = {p["name"] for p in container(workload, component)["ports"]}
        assert target in pod_ports
    neurons = find(objects, "Service", "cortex-neuron")
    assert neurons["spec"]["clusterIP"] == "None"  # headless: one endpoint per neuron pod
    pods = find(objects, "PodMonitor", "cortex-operator")
    operator = find(objects, "Deployment", "cortex-operator")
    assert selects(pods["spec"]["selector"]["matchLabels"], pod_labels(operator))
    assert pods["metadata"]["labels"]["release"] == "kube-prom"
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container(operator, "operator")["ports"]}
    args = container(operator, "operator")["args"]
    assert f"--metrics-port={ports[endpoint['port']]}" in args  # scraped where it serves
    off = render("--set", "serviceMonitor.enabled=true,operator.enabled=false")
    assert not [o for o in off if o["kind"] == "PodMonitor"]


def test_example_placements_fit_the_modelplacement_crd(render: Render) -> None:
    crd = yaml.safe_load((REPO / "crds" / "modelplacements.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    placements = [
        o
        for o in render("--set", "examplePlacements.enabled=true")
        if o["kind"] == "ModelPlacement"
    ]
    assert placements
    for placement in placements:
        assert placement["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        assert placement["kind"] == crd["spec"]["names"]["kind"]
        spec = placement["spec"]
        assert set(schema["required"]) <= set(spec) <= set(schema["properties"])
        replicas = schema["properties"]["replicas"]["properties"]
        assert set(spec["replicas"]) <= set(replicas)
        assert 0 <= spec["replicas"]["min"] <= spec["replicas"]["max"]


def test_a_packaged_chart_carries_the_linked_files(helm: Path, tmp_path: Path) -> None:
    """`helm package` (what a chart registry gets) follows the links and stores the files."""
    done = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("cortex-*.tgz")
    with tarfile.open(archive) as tar:
        stored = {m.name: tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
        for name in CRDS:
            member = stored[f"cortex/crds/{name}"]
            assert member is not None and member.read() == (REPO / "crds" / name).read_bytes()
        member = stored["cortex/dashboards/cortex.json"]
        assert member is not None and member.read() == DASHBOARD.read_bytes()
