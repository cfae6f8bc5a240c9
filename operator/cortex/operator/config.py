"""How one operator process is configured: the `cortex operator` flags, as a typed value."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cortex.core.config import admin_token_from_env

DEFAULT_NEURON_SELECTOR = {
    "app.kubernetes.io/name": "cortex",
    "app.kubernetes.io/component": "neuron",
}
NEURON_PORT = 13131
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the handlers need to know; timings are seconds."""

    namespaces: tuple[str, ...] = ("default",)  # empty: every namespace
    neuron_selector: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NEURON_SELECTOR))
    admin_token: str | None = None
    probe_interval: float = 5.0
    peering: str | None = None  # None with standalone False: kopf's default, non-mandatory
    standalone: bool = False
    priority: int | None = None  # kopf peering priority; None: a random one for each peer
    liveness: str | None = None
    metrics_port: int | None = None  # the operator's /metrics on this port (None: not served)
    unreachable_after: int = 2  # consecutive failed probes before a neuron is Unreachable
    retry_backoff: float = 10.0  # first wait after a failed load; doubles up to retry_backoff_max
    retry_backoff_max: float = 600.0
    load_timeout: float = 1800.0  # a load that takes longer is given up (and backed off)
    # An API server request that takes longer is given up and retried (kopf's error backoffs).
    # kopf's own default, 5 minutes, held a request that long on a kept-alive connection
    # dropped without a word (a load balancer's idle cut; in the tests, the emulator's: a
    # peer's goodbye to the peering object at shutdown waited out the 5 minutes).
    api_timeout: float = 30.0

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before retrying a load that failed `attempts` times in a row."""
        return float(min(self.retry_backoff * 2 ** max(attempts - 1, 0), self.retry_backoff_max))


def parse_selector(text: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'} (equality terms only, as kopf filters labels)."""
    selector: dict[str, str] = {}
    for term in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key.strip() or "!" in key:
            raise ValueError(f"neuron selector term {term!r}: use key=value[,key=value]")
        selector[key.strip()] = value.strip().lstrip("=")
    return selector


def default_namespace() -> str:
    """The release namespace: POD_NAMESPACE (downward API), the service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    return "default"


def read_admin_token(path: str | None) -> str | None:
    """The neurons' admin token: CORTEX_ADMIN_TOKEN, else the file's first line; stripped both
    ways, as the neuron strips it (cortex.core.config.admin_token_from_env)."""
    if token := admin_token_from_env():
        return token
    if path:
        return Path(path).expanduser().read_text().strip() or None
    return None
