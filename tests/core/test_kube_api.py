"""cortex.core.kube_api: login from a service account or a kubeconfig, `cortex gateway`'s choice of
the Kubernetes fleet, and the reflector's list + watch (resume, re-list after 410)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cortex.cli.commands import kubernetes_login
from cortex.cli.main import _parser
from cortex.core import kube_api
from cortex.core.config import GatewayConfig
from cortex.core.kube_api import KubeApi, KubeApiError, KubeLogin, Reflector, Resource

PLACEMENTS = Resource("cortex.helexa.ai", "v1alpha1", "modelplacements")


def write_kubeconfig(folder: Path, user: dict[str, Any]) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "work",
        "contexts": [
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "no"}},
            {"name": "work", "context": {"cluster": "c", "user": "u", "namespace": "cortex"}},
        ],
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://10.1.2.3:6443",
                    "certificate-authority-data": base64.b64encode(b"PEM CA").decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
    }
    path = folder / "config"
    path.write_text(yaml.safe_dump(config))
    return path


def test_kubeconfig_current_context_gives_server_ca_token_and_namespace(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path, {"token": "t0k", "client-certificate": "certs/me.crt"})
    login = kube_api.kubeconfig_login(environ={"KUBECONFIG": str(path)})
    assert (login.server, login.namespace, login.token) == (
        "https://10.1.2.3:6443",
        "cortex",
        "t0k",
    )
    assert login.ca_data == "PEM CA"
    assert login.cert_file == tmp_path / "certs/me.crt"  # relative to the kubeconfig


def test_kubeconfig_exec_plugins_are_refused_with_a_reason(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path, {"exec": {"command": "aws"}})
    with pytest.raises(KubeApiError, match="exec"):
        kube_api.kubeconfig_login(path)
    with pytest.raises(KubeApiError, match="cannot read kubeconfig"):
        kube_api.kubeconfig_login(tmp_path / "missing")


def test_in_cluster_login_reads_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("cortex-prod")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    login = kube_api.in_cluster_login(tmp_path, environ)
    assert login is not None
    assert (login.server, login.namespace) == ("https://10.96.0.1:443", "cortex-prod")
    assert login.token_file == tmp_path / "token"
    assert kube_api.in_cluster_login(tmp_path, {}) is None


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = write_kubeconfig(tmp_path, {"token": "t0k"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("CORTEX_KUBERNETES", raising=False)
    monkeypatch.delenv("CORTEX_NAMESPACE", raising=False)
    yield path


def test_the_charts_gateway_command_line_runs_on_the_crds(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # charts/cortex/templates/gateway-deployment.yaml: the args and CORTEX_NAMESPACE it sets.
    monkeypatch.setenv("CORTEX_NAMESPACE", "release-ns")
    args = _parser().parse_args(["gateway", "--kubernetes", "--config=/etc/cortex/cortex.toml"])
    login = kubernetes_login(args, GatewayConfig())
    assert login is not None and login.namespace == "release-ns"
    assert login.server == "https://10.1.2.3:6443"


def test_in_a_pod_without_neurons_the_gateway_runs_on_the_crds(kubeconfig: Path) -> None:
    args = _parser().parse_args(["gateway", "--namespace", "ns1"])
    pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBECONFIG": str(kubeconfig)}
    login = kubernetes_login(args, GatewayConfig(), pod)
    assert login is not None and login.namespace == "ns1"
    static = GatewayConfig.model_validate(
        {"neurons": [{"name": "n1", "endpoint": "http://10.0.0.5:13131"}]}
    )
    assert kubernetes_login(args, static, pod) is None  # [[neurons]] win: a static fleet
    assert kubernetes_login(args, GatewayConfig(), {}) is None  # not in a cluster, no flag


class FakeApiServer:
    """Answers list and watch of one resource from a script; records what was asked."""

    def __init__(self, lists: list[tuple[list[str], str]], watches: list[list[dict[str, Any]]]):
        self.lists, self.watches = lists, watches
        self.asked: list[tuple[str, str | None]] = []
        self.auth: list[str | None] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        if request.url.params.get("watch") == "true":
            version = request.url.params.get("resourceVersion")
            self.asked.append(("watch", version))
            events = self.watches.pop(0) if self.watches else []
            lines = "".join(json.dumps(e) + "\n" for e in events)
            return httpx.Response(200, content=lines.encode())
        self.asked.append(("list", None))
        names, version = self.lists.pop(0)
        items = [{"metadata": {"name": n, "resourceVersion": version}} for n in names]
        return httpx.Response(200, json={"metadata": {"resourceVersion": version}, "items": items})


def event(kind: str, name: str, version: str) -> dict[str, Any]:
    return {"type": kind, "object": {"metadata": {"name": name, "resourceVersion": version}}}


async def test_the_reflector_resumes_watches_and_lists_again_after_410(tmp_path: Path) -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
    server = FakeApiServer(
        lists=[(["a"], "10"), (["c"], "20")],
        watches=[
            [event("ADDED", "b", "11")],  # ends normally: resumed from 11
            [event("DELETED", "a", "12"), gone],  # expired: listed again
            [event("BOOKMARK", "", "21")],
        ],
    )
    (tmp_path / "token").write_text("from-file\n")
    login = KubeLogin(server="http://api", token_file=tmp_path / "token")
    api = KubeApi(login, transport=httpx.MockTransport(server.handle))
    seen: list[set[str]] = []
    reflector = Reflector(api, PLACEMENTS, "default", lambda: seen.append(set(reflector.objects)))
    task = asyncio.create_task(reflector.run())
    try:
        while len(server.asked) < 6:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.aclose()
    assert server.asked[:6] == [
        ("list", None),
        ("watch", "10"),
        ("watch", "11"),
        ("list", None),
        ("watch", "20"),
        ("watch", "21"),
    ]
    assert seen[:4] == [{"a"}, {"a", "b"}, {"b"}, {"c"}]
    assert reflector.connected and reflector.listed.is_set()
    assert set(server.auth) == {"Bearer from-file"}
