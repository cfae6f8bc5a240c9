"""`cortex operator`: the flags as an OperatorConfig, and the kopf operator run in this process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import kopf

from cortex.core.resources import GROUP
from cortex.operator import kube
from cortex.operator.config import (
    OperatorConfig,
    default_namespace,
    parse_selector,
    read_admin_token,
)
from cortex.operator.controller import Controller
from cortex.operator.handlers import build_registry


def check_credentials() -> None:
    """Fail at once, in one line, where kopf would retry a login that cannot work forever."""
    in_cluster = Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    configs = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if in_cluster or any(Path(p).expanduser().exists() for p in configs.split(os.pathsep) if p):
        return
    raise ValueError(
        "no Kubernetes credentials: not in a pod, and no kubeconfig (KUBECONFIG or ~/.kube/config)"
    )


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    """The parsed `cortex operator` flags (each defaulted from its CORTEX_* variable)."""
    if args.peering and args.standalone:
        raise ValueError("--peering and --standalone exclude each other")
    if args.priority is not None and args.standalone:
        raise ValueError("--priority is a peer's: it means nothing with --standalone")
    if args.all_namespaces and args.namespace:
        raise ValueError("--namespace and --all-namespaces exclude each other")
    namespaces = () if args.all_namespaces else (args.namespace or default_namespace(),)
    extra: dict[str, Any] = {}
    if args.neuron_selector:
        extra["neuron_selector"] = parse_selector(args.neuron_selector)
    if args.probe_interval is not None:
        if args.probe_interval <= 0:
            raise ValueError("--probe-interval must be positive")
        extra["probe_interval"] = float(args.probe_interval)
    metrics_port = _port(args.metrics_port)
    return OperatorConfig(
        namespaces=namespaces,
        metrics_port=metrics_port or None,
        admin_token=read_admin_token(args.admin_token_file),
        peering=args.peering or None,
        standalone=bool(args.standalone),
        priority=args.priority,
        liveness=_liveness(args.liveness),
        **extra,
    )


DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 31315


def _port(flag: str | None) -> int:
    """--metrics-port: 31315 unless set; 0 turns the metrics off."""
    if flag is None:
        return DEFAULT_METRICS_PORT
    try:
        port = int(flag)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ValueError(f"--metrics-port {flag!r}: not a port number (0 turns the metrics off)")
    return port


def _liveness(flag: str | None) -> str | None:
    """kopf's liveness endpoint: on :8080 unless set, and off with 'off'."""
    if flag is None:
        return DEFAULT_LIVENESS
    return None if flag.strip().lower() in ("", "off", "none") else flag


def operator_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    """kopf's settings: our finalizer name, and kopf's own bookkeeping kept in annotations (the
    structural status schema would prune a status.kopf field)."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = config.api_timeout  # watch streams are not cut by it
    settings.networking.connect_timeout = min(10.0, config.api_timeout)
    settings.peering.mandatory = config.peering is not None
    return settings


async def run(
    config: OperatorConfig,
    *,
    login: bool = True,
    customize: Callable[[kopf.OperatorRegistry], None] | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the operator until stopped (a signal, or `stop_flag` for an embedded one)."""
    if config.peering is not None and config.priority is None:
        # kopf pauses every peer when two share the top priority: each pod draws its own.
        config = replace(config, priority=secrets.randbelow(2**31 - 1) + 1)
    controller = Controller(config)
    registry = build_registry(controller, login=login)
    if customize is not None:
        customize(registry)
    controller.settings = operator_settings(config)
    if config.metrics_port is not None:
        controller.metrics.serve(config.metrics_port)
    try:
        await kopf.operator(
            registry=registry,
            settings=controller.settings,
            standalone=config.standalone,
            peering_name=config.peering,
            priority=config.priority,
            identity=kube.peer_identity(controller.identity),
            namespaces=config.namespaces,
            clusterwide=config.all_namespaces,
            liveness_endpoint=config.liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await controller.aclose()
