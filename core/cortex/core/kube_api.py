"""A small async client of the Kubernetes API for the gateway on Kubernetes (docs/kubernetes.md):
log in, list, watch, get, create and merge-patch namespaced resources, and keep a watched copy of
them.

The operator logs in through kopf; this client keeps the gateway free of kopf and of the
`kubernetes` package. Login is the pod's service account in a cluster, else the kubeconfig's
current context (server, CA, bearer token or client certificate; exec plugins are not supported).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A watch asks the server to end it after this long; it is then resumed from its last version.
WATCH_SECONDS = 300
# A watch that ends sooner than this without an event is resumed only after a backoff.
QUICK_WATCH_SECONDS = 1.0
# A rotated service account token is picked up within this long.
TOKEN_REREAD_SECONDS = 60.0


class KubeApiError(Exception):
    """The API server refused a request, or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class Gone(KubeApiError):
    """410: the resourceVersion a watch resumed from has expired; list again."""


class Conflict(KubeApiError):
    """409: a write named a resourceVersion the object no longer has (or created one that is
    there): read it again and redo the change."""


@dataclass(frozen=True)
class Resource:
    """A resource type: group ('' for the core group), version, plural."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path


@dataclass(frozen=True)
class KubeLogin:
    """Where the API server is, how to trust it and who we are; `namespace` is where to work."""

    server: str
    namespace: str = "default"
    token: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    ca_data: str | None = None  # PEM
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_data: bytes | None = None  # PEM
    key_data: bytes | None = None  # PEM
    insecure: bool = False


def in_cluster_login(
    root: Path = SERVICE_ACCOUNT, environ: Mapping[str, str] = os.environ
) -> KubeLogin | None:
    """The pod's service account, when running in a cluster (None otherwise)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not (root / "token").is_file():
        return None
    host = f"[{host}]" if ":" in host else host
    namespace_file = root / "namespace"
    return KubeLogin(
        server=f"https://{host}:{port or 443}",
        namespace=namespace_file.read_text().strip() if namespace_file.is_file() else "default",
        token_file=root / "token",
        ca_file=root / "ca.crt" if (root / "ca.crt").is_file() else None,
    )


def kubeconfig_login(
    path: Path | None = None, environ: Mapping[str, str] = os.environ
) -> KubeLogin:
    """The kubeconfig's current context ($KUBECONFIG's first file, else ~/.kube/config)."""
    if path is None:
        first = environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        path = Path(first or "~/.kube/config").expanduser()
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KubeApiError(0, f"cannot read kubeconfig {path}: {exc}") from None
    here = path.parent

    def named(kind: str, name: str | None) -> dict[str, Any]:
        for entry in config.get(f"{kind}s") or []:
            if entry.get("name") == name:
                found: dict[str, Any] = entry.get(kind) or {}
                return found
        raise KubeApiError(0, f"kubeconfig {path}: no {kind} named {name!r}")

    context = named("context", config.get("current-context"))
    cluster, user = named("cluster", context.get("cluster")), named("user", context.get("user"))
    if "exec" in user or "auth-provider" in user:
        raise KubeApiError(0, f"kubeconfig {path}: exec and auth-provider logins are not supported")

    def file(value: str | None) -> Path | None:
        return None if not value else (here / Path(value).expanduser())

    def data(value: str | None) -> bytes | None:
        return base64.b64decode(value) if value else None

    ca_data = data(cluster.get("certificate-authority-data"))
    return KubeLogin(
        server=cluster["server"],
        namespace=context.get("namespace") or "default",
        token=user.get("token"),
        token_file=file(user.get("tokenFile")),
        ca_file=file(cluster.get("certificate-authority")),
        ca_data=ca_data.decode() if ca_data else None,
        cert_file=file(user.get("client-certificate")),
        key_file=file(user.get("client-key")),
        cert_data=data(user.get("client-certificate-data")),
        key_data=data(user.get("client-key-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )


def login(environ: Mapping[str, str] = os.environ) -> KubeLogin:
    """The service account in a cluster, else the kubeconfig."""
    return in_cluster_login(environ=environ) or kubeconfig_login(environ=environ)


def _tls(login: KubeLogin) -> ssl.SSLContext | bool:
    if not login.server.startswith("https:"):
        return True
    if login.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(login.ca_file) if login.ca_file else None, cadata=login.ca_data
    )
    if login.cert_file and login.key_file:
        context.load_cert_chain(login.cert_file, login.key_file)
    elif login.cert_data and login.key_data:
        # ssl loads a client certificate from files only; they live as long as this call.
        with tempfile.TemporaryDirectory() as folder:
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_bytes(login.cert_data)
            key.write_bytes(login.key_data)
            context.load_cert_chain(cert, key)
    return context


class _Bearer(httpx.Auth):
    """The bearer token, from the login or its file (re-read: service account tokens rotate)."""

    def __init__(self, token: str | None, token_file: Path | None) -> None:
        self._token, self._file = token, token_file
        self._read_at = -TOKEN_REREAD_SECONDS

    def _current(self) -> str | None:
        if self._file is not None and time.monotonic() - self._read_at >= TOKEN_REREAD_SECONDS:
            self._token = self._file.read_text().strip()
            self._read_at = time.monotonic()
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict[str, Any]


class KubeApi:
    """List, watch, get, create and merge-patch namespaced objects of one API server."""

    def __init__(
        self,
        login: KubeLogin,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.login = login
        self._http = httpx.AsyncClient(
            base_url=login.server.rstrip("/"),
            verify=_tls(login),
            auth=_Bearer(login.token, login.token_file),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list(self, resource: Resource, namespace: str) -> tuple[list[dict[str, Any]], str]:
        """Every object, and the resourceVersion to watch from."""
        body = await self._call("GET", resource.path(namespace))
        version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        return list(body.get("items") or []), version

    async def watch(
        self, resource: Resource, namespace: str, version: str
    ) -> AsyncIterator[WatchEvent]:
        """Changes after `version`, until the server ends the watch; Gone when it expired."""
        params = {"watch": "true", "allowWatchBookmarks": "true"}
        params["timeoutSeconds"] = str(WATCH_SECONDS)
        if version:
            params["resourceVersion"] = version
        timeout = httpx.Timeout(10.0, read=WATCH_SECONDS + 30.0)
        path = resource.path(namespace)
        async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                raise _refusal(response.status_code, _json(response.content))
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _refusal(int(status.get("code") or 500), status)
                yield WatchEvent(event["type"], event.get("object") or {})

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """One object, or None when there is none."""
        try:
            return await self._call("GET", resource.path(namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(
        self, resource: Resource, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Create one object; returns it as stored (Conflict when its name is taken)."""
        return await self._call("POST", resource.path(namespace), json=body)

    async def merge_patch(
        self, resource: Resource, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of one object; returns the object as stored."""
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call(
            "PATCH", resource.path(namespace, name), content=json.dumps(patch), headers=headers
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise KubeApiError(0, f"{method} {path}: {exc!r}") from exc
        body = _json(response.content)
        if response.status_code >= 400:
            raise _refusal(response.status_code, body)
        return body


def _json(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {"message": content[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {}


def _refusal(status: int, body: Mapping[str, Any]) -> KubeApiError:
    message = str(body.get("message") or body.get("reason") or "refused")
    kind = {410: Gone, 409: Conflict}.get(status, KubeApiError)
    return kind(status, message)


class Reflector:
    """One resource's objects in one namespace, kept current: list, then watch from the list's
    resourceVersion, resume where a watch ended, list again after an expired version (410) or an
    error, with backoff. `changed` is called after every change to `objects`."""

    def __init__(
        self,
        api: KubeApi,
        resource: Resource,
        namespace: str,
        changed: Callable[[], None],
        *,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.api, self.resource, self.namespace = api, resource, namespace
        self.changed = changed
        self.backoff = backoff
        self.objects: dict[str, dict[str, Any]] = {}
        # Listed and not failing since: `objects` is current. Once listed they are kept while
        # the watch reconnects, stale but usable.
        self.connected = False
        self.listed = asyncio.Event()
        self.tried = asyncio.Event()  # the first list has answered or failed

    async def run(self) -> None:
        delay = self.backoff[0]
        version: str | None = None
        while True:
            try:
                if version is None:
                    items, version = await self.api.list(self.resource, self.namespace)
                    self.objects = {_name(item): item for item in items}
                    if self.listed.is_set() and not self.connected:
                        log.info("watch of %s is back", self.resource.plural)
                    self.connected = True
                    self.listed.set()
                    self.tried.set()
                    self._notify()
                began, events = time.monotonic(), 0
                async for event in self.api.watch(self.resource, self.namespace, version):
                    version = self._apply(event) or version
                    delay, events = self.backoff[0], events + 1
                if not events and time.monotonic() - began < QUICK_WATCH_SECONDS:
                    # Ended at once with nothing to say: resuming at once would spin.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
            except Gone:
                log.info("watch of %s expired; listing again", self.resource.plural)
                version = None
            except (KubeApiError, httpx.HTTPError, ValueError, KeyError) as exc:
                self.connected = False
                self.tried.set()
                version = None  # a fresh list also catches what the broken watch missed
                log.warning(
                    "watch of %s failed (%s); retrying in %.1fs", self.resource.plural, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    def _apply(self, event: WatchEvent) -> str | None:
        """Apply one event; returns the version it brings (bookmarks bring only that)."""
        version = (event.object.get("metadata") or {}).get("resourceVersion")
        if event.type == "BOOKMARK":
            return str(version) if version else None
        name = _name(event.object)
        if event.type == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = event.object
        self._notify()
        return str(version) if version else None

    def _notify(self) -> None:
        try:
            self.changed()
        except Exception:  # a bug in a reader must not stop the watch everyone reads
            log.exception("reading a change of %s failed", self.resource.plural)


def _name(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])
