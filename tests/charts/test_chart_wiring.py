"""The rendered objects fit together and fit cortex: RBAC is exactly what docs/kubernetes.md lists,
probes hit routes the apps really serve, selectors select the pods they mean, the configs the chart
writes are valid cortex configs, and secrets reach the pods that need them."""

from __future__ import annotations

import base64
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rendered import CHART, Render, container, find, pod_labels, run_helm, selects

from cortex.cli.main import _parser
from cortex.core.config import GatewayConfig, NeuronConfig, NeuronSection, parse_config

CPU = ["-f", str(CHART / "values-cpu.yaml")]

# The operator's permissions (docs/kubernetes.md): (API group, resource, verb).
OPERATOR_ROLE = {
    *(
        ("cortex.helexa.ai", "neurons", v)
        for v in ("get", "list", "watch", "create", "patch", "delete")
    ),
    *(("cortex.helexa.ai", "neurons/status", v) for v in ("get", "patch")),
    *(("cortex.helexa.ai", "modelplacements", v) for v in ("get", "list", "watch", "patch")),
    *(("cortex.helexa.ai", "modelplacements/status", v) for v in ("get", "patch")),
    *(("", "pods", v) for v in ("get", "list", "watch")),
    ("", "events", "create"),
    *(("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")),
}
OPERATOR_CLUSTER_ROLE = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}
GATEWAY_ROLE = {
    *(
        ("cortex.helexa.ai", r, v)
        for r in ("modelplacements", "neurons")
        for v in ("get", "list", "watch")
    ),
    ("cortex.helexa.ai", "modelplacements", "patch"),
    ("cortex.helexa.ai", "neurons", "patch"),  # the admin API's cordon
    # The budget spend's ConfigMap: created by the first gateway, then read and written by name.
    ("", "configmaps", "create"),
    ("", "configmaps", "get"),
    ("", "configmaps", "patch"),
}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_is_exactly_what_each_component_uses(render: Render) -> None:
    objects = render()
    assert grants(find(objects, "Role", "cortex-operator")) == OPERATOR_ROLE
    assert grants(find(objects, "ClusterRole", "cortex-ai-operator")) == OPERATOR_CLUSTER_ROLE
    assert grants(find(objects, "Role", "cortex-gateway")) == GATEWAY_ROLE
    assert not any(
        "*" in str(rule) for o in objects if "Role" in o["kind"] for rule in o.get("rules", [])
    )


@pytest.mark.parametrize(
    ("binding", "role", "workload"),
    [
        ("RoleBinding", "cortex-operator", "cortex-operator"),
        ("ClusterRoleBinding", "cortex-ai-operator", "cortex-operator"),
        ("RoleBinding", "cortex-gateway", "cortex-gateway"),
    ],
)
def test_each_role_is_bound_to_the_account_its_pods_run_as(
    render: Render, binding: str, role: str, workload: str
) -> None:
    objects = render()
    bound = find(objects, binding, role)
    assert bound["roleRef"]["name"] == role
    assert bound["roleRef"]["kind"] == binding.removesuffix("Binding")
    account = find(objects, "Deployment", workload)["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    assert bound["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ai"}]
    find(objects, "ServiceAccount", account)


def named_port(pod_container: dict[str, Any], name: str) -> int:
    (port,) = (p["containerPort"] for p in pod_container["ports"] if p["name"] == name)
    return int(port)


def test_gateway_probes_and_ports_are_the_ones_it_serves(render: Render) -> None:
    from cortex.gateway.app import create_app, create_metrics_app

    objects = render()
    gateway = container(find(objects, "Deployment", "cortex-gateway"), "gateway")
    config = tomllib.loads(find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"])
    assert config["gateway"]["listen"] == f"0.0.0.0:{named_port(gateway, 'api')}"
    assert config["gateway"]["metrics_listen"] == f"0.0.0.0:{named_port(gateway, 'metrics')}"
    assert named_port(gateway, "api") == 31313 and named_port(gateway, "metrics") == 31314
    app = create_app(GatewayConfig(), [])
    client = TestClient(app)  # no lifespan: an empty fleet, so /readyz says 503, not 404
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "api"}
    assert client.get("/livez").status_code == 200
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "api"}
    assert client.get("/readyz").status_code == 503
    assert TestClient(create_metrics_app(app)).get("/metrics").status_code == 200
    for name, port in (("cortex-gateway", "api"), ("cortex-gateway-metrics", "metrics")):
        service = find(objects, "Service", name)
        assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port)]
        assert selects(
            service["spec"]["selector"], pod_labels(find(objects, "Deployment", "cortex-gateway"))
        )


@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_an_exposed_gateway_service_carries_the_api_only(render: Render, service_type: str) -> None:
    """/metrics on 31314 needs no key: a NodePort or a LoadBalancer must not publish it."""
    objects = render("--set", f"gateway.service.type={service_type}")
    exposed = [
        o
        for o in objects
        if o["kind"] == "Service" and o["spec"].get("type", "ClusterIP") != "ClusterIP"
    ]
    assert [o["metadata"]["name"] for o in exposed] == ["cortex-gateway"]
    assert [p["targetPort"] for p in exposed[0]["spec"]["ports"]] == ["api"]
    metrics = find(objects, "Service", "cortex-gateway-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"


def test_neuron_probes_and_port_are_the_ones_it_serves(render: Render) -> None:
    from cortex.neuron.api_lifecycle import router

    neuron = container(find(render(), "DaemonSet", "cortex-neuron"), "neuron")
    assert named_port(neuron, "http") == 13131
    args = _parser().parse_args(neuron["args"])  # the real CLI accepts the pod's command line
    assert (args.command, args.port, args.host) == ("neuron", 13131, "0.0.0.0")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert neuron[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"/health", "/metrics"} <= {route.path for route in router.routes}


def test_operator_runs_kopf_with_its_health_endpoint(render: Render) -> None:
    operator = container(find(render(), "Deployment", "cortex-operator"), "operator")
    assert operator["command"] == ["cortex"] and operator["args"][0] == "operator"
    assert named_port(operator, "health") == 8080
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_finds_exactly_this_releases_neuron_pods(render: Render) -> None:
    for release in ("cortex", "cortex-b"):
        objects = render(release=release)
        operator = container(find(objects, "Deployment", f"{release}-operator"), "operator")
        (selector,) = (
            a.split("=", 1)[1] for a in operator["args"] if a.startswith("--neuron-selector=")
        )
        wanted = dict(pair.split("=") for pair in selector.split(","))
        neuron_pods = pod_labels(find(objects, "DaemonSet", f"{release}-neuron"))
        assert selects(wanted, neuron_pods)
        assert neuron_pods["app.kubernetes.io/name"] == "cortex"
        assert neuron_pods["app.kubernetes.io/component"] == "neuron"
        assert wanted["app.kubernetes.io/instance"] == release


def test_operator_is_standalone_alone_and_peered_in_a_group(render: Render) -> None:
    alone = find(render(), "Deployment", "cortex-operator")
    assert "--standalone" in container(alone, "operator")["args"]
    assert alone["spec"]["strategy"] == {"type": "Recreate"}
    objects = render("--set", "operator.replicas=3")
    group = find(objects, "Deployment", "cortex-operator")
    peering = find(objects, "KopfPeering")
    assert group["spec"]["replicas"] == 3 and "strategy" not in group["spec"]
    assert f"--peering={peering['metadata']['name']}" in container(group, "operator")["args"]
    assert "--standalone" not in container(group, "operator")["args"]


def test_network_policy_admits_only_the_gateway_and_operator(render: Render) -> None:
    objects = render("--set", "serviceMonitor.enabled=true")
    policy = find(objects, "NetworkPolicy")["spec"]
    pods = {
        "gateway": pod_labels(find(objects, "Deployment", "cortex-gateway")),
        "operator": pod_labels(find(objects, "Deployment", "cortex-operator")),
        "neuron": pod_labels(find(objects, "DaemonSet", "cortex-neuron")),
    }
    assert selects(policy["podSelector"]["matchLabels"], pods["neuron"])
    assert not selects(policy["podSelector"]["matchLabels"], pods["gateway"])
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    admitted = {
        name
        for name, labels in pods.items()
        for peer in rule["from"]
        if selects(peer["podSelector"]["matchLabels"], labels)
    }
    assert admitted == {"gateway", "operator"}
    neuron = container(find(objects, "DaemonSet", "cortex-neuron"), "neuron")
    assert [p["port"] for p in rule["ports"]] == ["http"] and named_port(neuron, "http")
    # A second release's gateway is another app: its pods do not match.
    other = pod_labels(find(render(release="cortex-b"), "Deployment", "cortex-b-gateway"))
    assert not any(selects(peer["podSelector"]["matchLabels"], other) for peer in rule["from"])


def test_network_policy_lets_prometheus_in_when_asked(render: Render) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = render("--set-json", f"networkPolicy.metricsFrom=[{json.dumps(peer)}]")
    assert peer in find(objects, "NetworkPolicy")["spec"]["ingress"][0]["from"]


def test_gpu_install_requests_the_device_plugin_resource(render: Render) -> None:
    neuron = find(render(), "DaemonSet", "cortex-neuron")
    resources = container(neuron, "neuron")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert container(neuron, "neuron")["image"].endswith(":0.1.0")
    tolerations = neuron["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "runtimeClassName" not in neuron["spec"]["template"]["spec"]
    more = find(
        render(
            "--set",
            "neuron.gpu.count=4,neuron.nodeSelector.pool=a100,neuron.runtimeClassName=nvidia",
        ),
        "DaemonSet",
    )
    assert container(more, "neuron")["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert more["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "a100"}
    assert more["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def test_cpu_install_requests_no_gpu_and_serves_the_small_model(
    render: Render, template: Any
) -> None:
    assert "nvidia.com/gpu" not in template(*CPU)
    objects = render(*CPU)
    neuron = find(objects, "DaemonSet", "cortex-neuron")
    assert container(neuron, "neuron")["image"].endswith(":0.1.0-cpu")
    assert "tolerations" not in neuron["spec"]["template"]["spec"]
    (placement,) = (o for o in objects if o["kind"] == "ModelPlacement")
    assert placement["spec"]["model"] == "smollm2-135m-instruct"
    assert placement["spec"]["replicas"]["min"] >= 1


def test_neuron_config_takes_exactly_the_keys_the_chart_leaves_to_you(render: Render) -> None:
    """values.schema.json lists neuron.config's keys, so a misspelt one fails `helm install`
    rather than every neuron's start; the list is NeuronSection's fields less the chart's own."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["neuron"]["properties"]["config"]
    refused = set(config["propertyNames"]["not"]["enum"])
    fields = set(NeuronSection.model_fields)
    assert refused <= fields  # a renamed field leaves no stale refusal behind
    assert set(config["properties"]) - refused == fields - refused
    assert config["additionalProperties"] is False
    objects = render("--set", "neuron.preload={smollm2-135m-instruct}")
    neuron_toml = find(objects, "ConfigMap", "cortex-neuron")["data"]["neuron.toml"]
    assert set(tomllib.loads(neuron_toml)["neuron"]) <= refused  # what the chart writes itself
    assert {"admin_token", "admin_token_file"} <= refused  # the token comes from adminToken


def test_the_configs_the_chart_writes_are_valid_cortex_configs(render: Render) -> None:
    objects = render(
        *CPU,
        "--set",
        "neuron.config.kv_tokens=8192,neuron.config.dtype=float32,neuron.preload={smollm2-135m-instruct}",
    )
    neuron_toml = find(objects, "ConfigMap", "cortex-neuron")["data"]["neuron.toml"]
    neuron = parse_config(tomllib.loads(neuron_toml), NeuronConfig, "neuron.toml").neuron
    assert (neuron.kv_tokens, neuron.dtype, neuron.cpu_memory) == (8192, "float32", 3 * 2**30)
    assert neuron.preload == ["smollm2-135m-instruct"] and neuron.port == 13131
    daemonset = find(objects, "DaemonSet", "cortex-neuron")
    mounts = {m["name"]: m["mountPath"] for m in container(daemonset, "neuron")["volumeMounts"]}
    assert str(neuron.cache_dir) == mounts["model-cache"]
    assert str(neuron.hf_cache).startswith(mounts["model-cache"])

    gateway_toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
    gateway = parse_config(tomllib.loads(gateway_toml), GatewayConfig, "cortex.toml")
    assert gateway.gateway.load_timeout == 120 and gateway.gateway.max_body_bytes == 16 * 2**20
    assert gateway.auth.enabled and not gateway.neurons  # the fleet comes from the CRDs
    assert not gateway.gateway.usage_log
    logged = find(render("--set", "gateway.usageLog=true"), "ConfigMap", "cortex-gateway")
    toml = tomllib.loads(logged["data"]["cortex.toml"])
    assert parse_config(toml, GatewayConfig, "cortex.toml").gateway.usage_log


@pytest.mark.parametrize(("listen_host", "address"), [(None, "0.0.0.0:{}"), ("::", "[::]:{}")])
def test_everything_listens_on_the_listen_host(
    render: Render,
    listen_host: str | None,
    address: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """IPv4 by default; `::` for IPv6 clusters, where the operator probes http://[pod IP]:13131."""
    from cortex.cli import commands
    from cortex.gateway.app import _split

    objects = render(*(["--set-string", f"listenHost={listen_host}"] if listen_host else []))
    host = listen_host or "0.0.0.0"
    neuron = container(find(objects, "DaemonSet", "cortex-neuron"), "neuron")
    assert _parser().parse_args(neuron["args"]).host == host
    neuron_toml = find(objects, "ConfigMap", "cortex-neuron")["data"]["neuron.toml"]
    assert parse_config(tomllib.loads(neuron_toml), NeuronConfig, "neuron.toml").neuron.host == host
    gateway_toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
    gateway = parse_config(tomllib.loads(gateway_toml), GatewayConfig, "cortex.toml").gateway
    assert (gateway.listen, gateway.metrics_listen) == (
        address.format(31313),
        address.format(31314),
    )
    assert _split(gateway.listen) == (host, 31313)
    # What the gateway pod resolves: its command line over cortex.toml, under the image's
    # CORTEX_HOST (Dockerfile.gateway sets one), which must not win over listenHost.
    monkeypatch.setenv("CORTEX_HOST", "192.0.2.1")
    pod = container(find(objects, "Deployment", "cortex-gateway"), "gateway")
    args = _parser().parse_args(pod["args"])
    (tmp_path / "cortex.toml").write_text(gateway_toml)
    args.config = str(tmp_path / "cortex.toml")
    resolved = commands.gateway_config(args).gateway
    assert (resolved.listen, resolved.metrics_listen) == (gateway.listen, gateway.metrics_listen)
    bound: list[str] = []
    monkeypatch.setattr(commands, "check_port", lambda host, *_: bound.append(host))
    commands.check_gateway_ports(commands.gateway_config(args))
    assert bound == [host, host]  # bind() takes ::, not [::]
    operator = container(find(objects, "Deployment", "cortex-operator"), "operator")
    liveness = _parser().parse_args(operator["args"]).liveness
    assert liveness == f"http://{address.format(8080)}/healthz"


def test_durations_may_be_numbers_of_seconds(render: Render, tmp_path: Path) -> None:
    """cortex reads 90 as 90 seconds; the schema lets it through, and the ServiceMonitors (which
    want a Prometheus duration string) get 90s."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "gateway:\n  loadTimeout: 90\n  requestTimeout: 90.5\n  auth:\n    keys:\n"
        "      - {name: ci, budgetTokens: 1000, budgetWindow: 3600}\n"
        "serviceMonitor: {enabled: true, interval: 60, scrapeTimeout: 15}\n"
    )
    for args in (["-f", str(values)], ["-f", str(values), "--set", "gateway.loadTimeout=90"]):
        objects = render(*args)
        toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
        config = parse_config(tomllib.loads(toml), GatewayConfig, "cortex.toml")
        assert (config.gateway.load_timeout, config.gateway.request_timeout) == (90, 90.5)
        assert config.auth.keys[0].budget_window == 3600
        monitors = [o for o in objects if o["kind"] in ("ServiceMonitor", "PodMonitor")]
        endpoints = [
            e
            for m in monitors
            for e in m["spec"].get("endpoints", m["spec"].get("podMetricsEndpoints"))
        ]
        assert len(endpoints) == 3
        assert {(e["interval"], e["scrapeTimeout"]) for e in endpoints} == {("60s", "15s")}


def test_api_keys_reach_the_gateway_as_files(render: Render, tmp_path: Path) -> None:
    """The gateway reads each key from the Secret entry mounted where cortex.toml says."""
    objects = render(
        "--set-json",
        'gateway.auth.keys=[{"name": "ci", "models": ["smollm2-135m-instruct"], '
        '"budgetTokens": 1000, "budgetWindow": "1d", "maxInFlight": 4}, {"name": "alice"}]',
    )
    secret = find(objects, "Secret", "cortex-api-keys")["data"]
    deployment = find(objects, "Deployment", "cortex-gateway")
    (volume,) = (
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys"
    )
    assert volume["secret"]["secretName"] == "cortex-api-keys"
    (mount,) = (
        m for m in container(deployment, "gateway")["volumeMounts"] if m["name"] == "api-keys"
    )
    # Lay the Secret out as the kubelet would, under tmp_path, and read the keys through cortex.
    for name, value in secret.items():
        (tmp_path / name).write_bytes(base64.b64decode(value))
    toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
    config = parse_config(
        tomllib.loads(toml.replace(mount["mountPath"], str(tmp_path))), GatewayConfig, "cortex.toml"
    )
    keys = {key.name: key for key in config.auth.keys}
    assert set(keys) == set(secret) == {"ci", "alice"}
    assert all(
        key.secret().startswith("sk-cortex-") and len(key.secret()) == 50 for key in keys.values()
    )
    assert keys["ci"].models == ["smollm2-135m-instruct"] and keys["ci"].budget_window == 86400
    assert keys["ci"].budget_tokens == 1000 and keys["alice"].budget_tokens is None
    assert keys["ci"].max_in_flight == 4 and keys["alice"].max_in_flight is None


def test_budget_spend_goes_to_the_configmap_the_gateway_may_write(render: Render) -> None:
    """Spend is shared by the gateway pods in one ConfigMap: the one cortex.toml names is the one
    the Role lets the gateway read and write (and no other)."""
    objects = render(
        "--set-json",
        'gateway.auth.keys=[{"name": "ci", "budgetTokens": 1000}, {"name": "ops", "admin": true}]',
    )
    toml = find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"]
    config = tomllib.loads(toml)["auth"]
    rules = find(objects, "Role", "cortex-gateway")["rules"]
    by_name = [r for r in rules if r["resources"] == ["configmaps"] and "resourceNames" in r]
    assert [r["resourceNames"] for r in by_name] == [[config["spend_configmap"]]]
    assert sorted(by_name[0]["verbs"]) == ["get", "patch"]
    create = [r for r in rules if r["resources"] == ["configmaps"] and "resourceNames" not in r]
    assert [r["verbs"] for r in create] == [["create"]]
    assert "spend_db" not in config  # a pod's own file would not be shared, nor outlive it
    admins = {key["name"]: key.get("admin", False) for key in config["keys"]}
    assert admins == {"ci": False, "ops": True}


def test_admin_token_reaches_the_operator_and_the_neurons(render: Render) -> None:
    for args, secret_name, key in (
        ((), "cortex-admin-token", "token"),
        (("--set", "adminToken.existingSecret=mine,adminToken.secretKey=admin"), "mine", "admin"),
    ):
        objects = render(*args)
        neuron = container(find(objects, "DaemonSet", "cortex-neuron"), "neuron")
        (env,) = (e for e in neuron["env"] if e["name"] == "CORTEX_ADMIN_TOKEN")
        assert env["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": key}
        deployment = find(objects, "Deployment", "cortex-operator")
        operator = container(deployment, "operator")
        (path,) = (
            a.split("=", 1)[1] for a in operator["args"] if a.startswith("--admin-token-file=")
        )
        (mount,) = (m for m in operator["volumeMounts"] if m["name"] == "admin-token")
        (volume,) = (
            v
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if v["name"] == "admin-token"
        )
        assert volume["secret"] == {
            "secretName": secret_name,
            "items": [{"key": key, "path": "token"}],
        }
        assert path == f"{mount['mountPath']}/token"
        # The gateway holds it too: the neurons trust a request's key (per-key fairness) only
        # from a caller with their token.
        gateway = find(objects, "Deployment", "cortex-gateway")
        (gateway_mount,) = (
            m for m in container(gateway, "gateway")["volumeMounts"] if m["name"] == "admin-token"
        )
        (gateway_volume,) = (
            v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "admin-token"
        )
        assert gateway_volume["secret"] == volume["secret"]
        toml = tomllib.loads(find(objects, "ConfigMap", "cortex-gateway")["data"]["cortex.toml"])
        assert toml["auth"]["neuron_admin_token_file"] == f"{gateway_mount['mountPath']}/token"
        generated = [
            o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name
        ]
        assert [set(s["data"]) for s in generated] == ([{key}] if not args else [])


# What Kubernetes puts in a pod's environment for Services named `cortex` and `cortex-metrics`
# in its namespace, unless the pod turns service links off: CORTEX_<FLAG> names of the CLI's.
SERVICE_LINKS = {
    "CORTEX_PORT": "tcp://10.96.0.10:80",
    "CORTEX_SERVICE_HOST": "10.96.0.10",
    "CORTEX_METRICS_PORT": "tcp://10.96.0.11:9090",
}


def test_services_of_the_namespace_cannot_set_a_pods_flags(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI takes CORTEX_<FLAG> variables as defaults: a Service named `cortex` once gave the
    gateway CORTEX_PORT=tcp://IP:PORT, and it exited. Pods take no service links, and the
    gateway names its ports; its command line holds even with the variables set."""
    objects = render()
    for workload in (o for o in objects if o["kind"] in ("Deployment", "DaemonSet")):
        name = workload["metadata"]["name"]
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False, name
    for key, value in SERVICE_LINKS.items():
        monkeypatch.setenv(key, value)
    gateway = container(find(objects, "Deployment", "cortex-gateway"), "gateway")
    args = _parser().parse_args(gateway["args"])
    assert (args.port, args.metrics_port) == (31313, 31314)
    assert (named_port(gateway, "api"), named_port(gateway, "metrics")) == (31313, 31314)


def test_every_cortex_container_runs_as_non_root(render: Render) -> None:
    for workload in (o for o in render() if o["kind"] in ("Deployment", "DaemonSet")):
        for pod_container in workload["spec"]["template"]["spec"]["containers"]:
            security = pod_container["securityContext"]
            assert security["runAsNonRoot"] and security["runAsUser"] != 0
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}


def test_model_cache_is_a_host_path_or_an_empty_dir(render: Render) -> None:
    spec = find(render(), "DaemonSet")["spec"]["template"]["spec"]
    (cache,) = (v for v in spec["volumes"] if v["name"] == "model-cache")
    assert cache["hostPath"] == {"path": "/var/cache/cortex", "type": "DirectoryOrCreate"}
    assert [c["name"] for c in spec["initContainers"]] == ["cache-owner"]
    spec = find(
        render("--set", "neuron.modelCache.type=emptyDir,neuron.modelCache.sizeLimit=20Gi"),
        "DaemonSet",
    )["spec"]["template"]["spec"]
    (cache,) = (v for v in spec["volumes"] if v["name"] == "model-cache")
    assert cache == {"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}}
    assert "initContainers" not in spec


@pytest.mark.parametrize(
    ("kind", "name", "component", "config"),
    [
        ("Deployment", "cortex-gateway", "gateway", "cortex.toml"),
        ("DaemonSet", "cortex-neuron", "neuron", "neuron.toml"),
    ],
)
def test_the_config_file_a_command_names_is_the_mounted_configmap(
    render: Render, kind: str, name: str, component: str, config: str
) -> None:
    objects = render()
    workload = find(objects, kind, name)
    pod_container = container(workload, component)
    (path,) = (a.split("=", 1)[1] for a in pod_container["args"] if a.startswith("--config="))
    (mount,) = (m for m in pod_container["volumeMounts"] if m["mountPath"] == path)
    assert mount.get("subPath") == config
    (volume,) = (
        v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    assert config in find(objects, "ConfigMap", volume["configMap"]["name"])["data"]


def test_the_gateway_runs_in_kubernetes_mode(render: Render) -> None:
    """`--kubernetes`: the fleet comes from the CRDs (docs/kubernetes.md)."""
    gateway = container(find(render(), "Deployment", "cortex-gateway"), "gateway")
    assert gateway["command"] == ["cortex"]
    assert gateway["args"] == [
        "gateway",
        "--kubernetes",
        "--config=/etc/cortex/cortex.toml",
        "--host=0.0.0.0",
        "--port=31313",
        "--metrics-port=31314",
    ]
    (namespace,) = (e for e in gateway["env"] if e["name"] == "CORTEX_NAMESPACE")
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_pods_outlive_their_own_drain_on_sigterm(render: Render) -> None:
    """The kubelet waits longer than each process's shutdown_grace, so a rolling update lets
    running streams finish instead of killing them."""
    objects = render("--set", "neuron.shutdownGraceSeconds=50,gateway.shutdownGraceSeconds=20")
    for kind, name, file, config_type in (
        ("DaemonSet", "cortex-neuron", "neuron.toml", NeuronConfig),
        ("Deployment", "cortex-gateway", "cortex.toml", GatewayConfig),
    ):
        toml = tomllib.loads(find(objects, "ConfigMap", name)["data"][file])
        config = parse_config(toml, config_type, file)
        section = config.neuron if isinstance(config, NeuronConfig) else config.gateway
        pod = find(objects, kind, name)["spec"]["template"]["spec"]
        assert section.shutdown_grace in (50, 20)
        pre_stop = 5 if kind == "Deployment" else 0  # the gateway's preStop delay comes first
        assert pod["terminationGracePeriodSeconds"] == pre_stop + section.shutdown_grace + 15


def test_the_gateway_keeps_serving_until_it_has_left_the_service(render: Render) -> None:
    """Kubernetes signals the pod as it takes it out of the endpoints; proxies notice later, and an
    idle gateway exits at once on SIGTERM. A preStop sleep bridges that (its time counts against
    the grace period)."""
    dockerfile = (CHART.parents[1] / "Dockerfile.gateway").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim$", dockerfile, re.M)  # has sleep
    for args, delay in (((), 5), (("--set", "gateway.preStopSeconds=12"), 12)):
        pod = find(render(*args), "Deployment", "cortex-gateway")["spec"]["template"]["spec"]
        (gateway,) = pod["containers"]
        assert gateway["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(delay)]}}
        assert pod["terminationGracePeriodSeconds"] == delay + 30 + 15
    off = find(render("--set", "gateway.preStopSeconds=0"), "Deployment", "cortex-gateway")
    assert "lifecycle" not in container(off, "gateway")


def test_several_gateway_pods_get_a_disruption_budget_that_selects_them(render: Render) -> None:
    """A node drain takes one gateway pod at a time; a single pod gets no budget, which would
    only block the drain."""
    assert not [o for o in render() if o["kind"] == "PodDisruptionBudget"]
    objects = render("--set", "gateway.replicas=3")
    budget = find(objects, "PodDisruptionBudget", "cortex-gateway")
    gateway = find(objects, "Deployment", "cortex-gateway")
    assert budget["spec"]["maxUnavailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(gateway))
    others = [o for o in objects if o["kind"] in ("Deployment", "DaemonSet") and o is not gateway]
    assert not any(
        selects(budget["spec"]["selector"]["matchLabels"], pod_labels(o)) for o in others
    )
    off = render("--set", "gateway.replicas=3,gateway.podDisruptionBudget.enabled=false")
    assert not [o for o in off if o["kind"] == "PodDisruptionBudget"]


def test_an_autoscaled_gateway_leaves_the_pod_count_to_the_autoscaler(render: Render) -> None:
    assert not [o for o in render() if o["kind"] == "HorizontalPodAutoscaler"]
    objects = render("--set", "gateway.autoscaling.enabled=true,gateway.autoscaling.maxReplicas=6")
    autoscaler = find(objects, "HorizontalPodAutoscaler", "cortex-gateway")
    gateway = find(objects, "Deployment", "cortex-gateway")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", gateway["metadata"]["name"])
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in gateway["spec"]  # a fixed count would fight the autoscaler
    # CPU utilisation is measured against the request, which the container must make.
    assert container(gateway, "gateway")["resources"]["requests"]["cpu"]
    # Two pods at least, so the disruption budget comes with it.
    assert find(objects, "PodDisruptionBudget", "cortex-gateway")["spec"]["maxUnavailable"] == 1


def test_an_autoscaler_whose_floor_is_above_its_ceiling_fails(helm: Path) -> None:
    values = ",".join(
        f"gateway.autoscaling.{v}" for v in ("enabled=true", "minReplicas=5", "maxReplicas=3")
    )
    result = run_helm(helm, "template", "cortex", str(CHART), "--set", values)
    assert result.returncode != 0
    assert "minReplicas is above maxReplicas" in result.stderr


def test_an_ingress_routes_its_hosts_to_the_gateways_api_port(render: Render) -> None:
    assert not [o for o in render() if o["kind"] == "Ingress"]
    objects = render(
        "--set",
        "gateway.ingress.enabled=true,gateway.ingress.className=nginx,"
        "gateway.ingress.tlsSecret=llm-tls",
        "--set-json",
        'gateway.ingress.hosts=["llm.example.com"]',
    )
    ingress = find(objects, "Ingress", "cortex-gateway")["spec"]
    service = find(objects, "Service", "cortex-gateway")
    (rule,) = ingress["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert rule["host"] == "llm.example.com" and path["pathType"] == "Prefix"
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert backend["port"]["name"] == "api"  # the API only: the metrics stay inside
    assert ingress["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    assert ingress["ingressClassName"] == "nginx"
    anywhere = find(render("--set", "gateway.ingress.enabled=true"), "Ingress")["spec"]
    assert "host" not in anywhere["rules"][0] and "tls" not in anywhere
