"""What each `cortex` subcommand does; heavy imports (torch, kopf) happen only in the command that needs them."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cortex.core.catalogue import DEFAULT_CATALOGUE, merge_catalogues
from cortex.core.client import NeuronClient
from cortex.core.config import (
    GatewayConfig,
    NeuronConfig,
    NeuronEntry,
    load_config,
    load_gateway_config,
)
from cortex.core.console import NeuronRow, print_fleet
from cortex.core.errors import CortexError
from cortex.core.fleet import DeviceStatus, LoadedModel, LoadRequest, ModelState, NeuronStatus
from cortex.core.shutdown import GracefulServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def neuron_config(args: argparse.Namespace) -> NeuronConfig:
    path = getattr(args, "config", None) if args.command == "neuron" else args.neuron_config
    config = load_config(Path(path), NeuronConfig) if path else NeuronConfig()
    section = config.neuron
    if args.command == "neuron":
        section.host = args.host or section.host
        section.port = int(args.port or section.port)
        section.admin_token = args.admin_token or section.admin_token
        section.preload = list(args.preload or section.preload)
    return config


async def serve(app: Any, host: str, port: int) -> None:
    """Run one ASGI app with uvicorn inside the current event loop; SIGTERM drains it first."""
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    await GracefulServer(config, app.state.drain).serve()


async def neuron(args: argparse.Namespace) -> None:
    from cortex.neuron.runtime import NeuronRuntime
    from cortex.neuron.server import create_app

    config = neuron_config(args)
    app = create_app(NeuronRuntime(config))  # the app's lifespan starts and stops the runtime
    await serve(app, config.neuron.host, config.neuron.port)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    config = load_gateway_config(Path(args.config).expanduser() if args.config else None)
    section = config.gateway
    host, _, port = section.listen.rpartition(":")
    section.listen = f"{args.host or host}:{args.port or port}"
    if section.metrics_listen and (args.host or args.metrics_port):
        metrics_host, _, metrics_port = section.metrics_listen.rpartition(":")
        section.metrics_listen = f"{args.host or metrics_host}:{args.metrics_port or metrics_port}"
    return config


async def gateway(args: argparse.Namespace) -> None:
    from cortex.gateway.app import serve as serve_gateway

    config = gateway_config(args)
    if not config.neurons:
        print(
            "cortex gateway: no [[neurons]] in the config; `cortex up` runs a local one",
            file=sys.stderr,
        )
    await serve_gateway(config, merge_catalogues(DEFAULT_CATALOGUE, config.models))


async def up(args: argparse.Namespace) -> None:
    """Gateway plus an in-process neuron on a private loopback port: one command, one machine."""
    from cortex.gateway.app import serve as serve_gateway
    from cortex.neuron.runtime import NeuronRuntime
    from cortex.neuron.server import create_app

    config = gateway_config(args)
    catalogue = merge_catalogues(DEFAULT_CATALOGUE, config.models)
    local = neuron_config(args)
    local.models = merge_catalogues(catalogue, local.models)
    runtime = NeuronRuntime(local, catalogue=[])
    await runtime.start()
    port = free_port()
    entry = NeuronEntry(
        name=local.neuron.name,
        endpoint=f"http://127.0.0.1:{port}",
        admin_token=local.neuron.admin_token,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime, manage_runtime=False), "127.0.0.1", port, log_level="warning"
        )
    )
    neuron_task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # the gateway's first poll must find the neuron answering
            if neuron_task.done():
                await neuron_task
                raise CortexError(f"the local neuron could not listen on 127.0.0.1:{port}")
            await asyncio.sleep(0.05)
        await serve_gateway(config, catalogue, extra_neurons=[entry])
    finally:
        server.should_exit = True
        await asyncio.gather(neuron_task, return_exceptions=True)
        await runtime.stop()


async def status(endpoint: str) -> int:
    """Fleet table from a gateway's /fleet, or from a single neuron's /status."""
    async with httpx.AsyncClient(base_url=endpoint.rstrip("/"), timeout=5) as http:
        try:
            response = await http.get("/fleet")
            if response.status_code == 200:
                rows = [_row(item) for item in response.json().get("neurons", [])]
            else:
                neuron_status = NeuronStatus.model_validate_json(
                    (await http.get("/status")).content
                )
                rows = [
                    NeuronRow(neuron_status.node, endpoint, neuron_status.healthy, neuron_status)
                ]
        except httpx.HTTPError as exc:
            print(f"cortex: cannot reach {endpoint}: {exc}", file=sys.stderr)
            return 1
    print_fleet(rows)
    return 0


def _row(item: dict[str, Any]) -> NeuronRow:
    """A neuron of the gateway's GET /fleet as a table row."""
    replicas = [LoadedModel.model_validate({"source": "", **r}) for r in item.get("replicas", [])]
    status = NeuronStatus(
        node=item.get("name", "?"),
        version="",
        devices=[DeviceStatus.model_validate(d) for d in item.get("devices", [])],
        models=replicas,
    )
    return NeuronRow(
        name=status.node,
        endpoint=item.get("endpoint", ""),
        healthy=bool(item.get("healthy")),
        status=status,
    )


async def models(args: argparse.Namespace) -> int:
    client = NeuronClient(args.endpoint or "http://127.0.0.1:13131", admin_token=args.admin_token)
    console = Console()
    try:
        if args.action == "load":
            await _load_with_progress(client, args.model, args.source, console)
        elif args.action == "unload":
            await client.unload(args.model, force=args.force)
            console.print(f"unloaded {args.model}")
        else:
            listing = await client.models()
            for model in listing.loaded:
                console.print(
                    f"{model.id:32} {model.state.value:10} {model.memory_bytes / 2**20:8.0f} MiB  {','.join(model.devices)}"
                )
            loaded = {m.id for m in listing.loaded}
            for spec in listing.available:
                if spec.id not in loaded:
                    console.print(f"{spec.id:32} {'available':10} {spec.source}")
    finally:
        await client.aclose()
    return 0


async def _load_with_progress(
    client: NeuronClient, model: str, source: str | None, console: Console
) -> None:
    record = await client.load(LoadRequest(model=model, source=source, wait=False))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"loading {record.id}", total=1.0)
        while record.state is ModelState.LOADING:
            progress.update(task, completed=record.progress)
            await asyncio.sleep(
                0.25
            )  # a human is watching a bar; this is pacing, not a wait for state
            current = [m for m in (await client.status()).models if m.id == record.id]
            if not current:
                raise CortexError(f"{record.id} disappeared while loading")
            record = current[0]
        progress.update(task, completed=1.0)
    if record.state is ModelState.FAILED:
        raise CortexError(f"load of {record.id} failed: {record.error}")
    console.print(
        f"{record.id} ready on {', '.join(record.devices)} ({record.memory_bytes / 2**20:.0f} MiB)"
    )


def bench(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "bench", *args])
