"""What each `cortex` subcommand does. A component and its server stack (uvicorn, FastAPI, torch,
kopf) are imported only by the command that runs it, so the client commands work on a base install."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cortex.cli import fleet_control
from cortex.cli.console import NeuronRow, print_fleet
from cortex.cli.endpoint import identify
from cortex.core import kube_api
from cortex.core.access_log import json_logs, redact_access_log
from cortex.core.admin import GatewayAdmin
from cortex.core.catalogue import (
    DEFAULT_CATALOGUE,
    ModelSpec,
    merge_catalogues,
    resolve_alias,
    unknown_model,
)
from cortex.core.client import NeuronClient
from cortex.core.config import (
    ConfigError,
    GatewayConfig,
    NeuronConfig,
    NeuronEntry,
    NeuronSection,
    admin_token_from_env,
    load_config,
    load_gateway_config,
)
from cortex.core.errors import CortexError, Forbidden, Unauthorized
from cortex.core.fleet import (
    NOT_LOADED,
    FleetView,
    LoadedModel,
    LoadRequest,
    NeuronStatus,
    shown_state,
)
from cortex.core.reload import hangup_handler
from cortex.core.request_context import RequestContext

if TYPE_CHECKING:
    from cortex.core.shutdown import Drain

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def neuron_config(args: argparse.Namespace, known: Sequence[ModelSpec] = ()) -> NeuronConfig:
    """The neuron's config from its file and flags; `known`: catalogue entries it will also get
    (`cortex up` hands its neuron the gateway's [[models]])."""
    path = getattr(args, "config", None) if args.command == "neuron" else args.neuron_config
    config = load_config(Path(path), NeuronConfig) if path else NeuronConfig()
    section = config.neuron
    if args.command == "neuron":
        section.host = args.host or section.host
        section.port = int(args.port or section.port)
        token, token_file = args.admin_token, args.admin_token_file
        if token is None and token_file is None:  # a flag of either kind wins over a variable
            token = admin_token_from_env()
            token_file = os.environ.get("CORTEX_ADMIN_TOKEN_FILE") or None
        section.admin_token = token or section.admin_token
        if token_file and not token:
            section.admin_token, section.admin_token_file = None, Path(token_file)
        section.preload = list(args.preload or section.preload)
    preload_sources(config, known)
    section.admin_secret()  # a missing or empty token file fails at start, not at the first load
    return config


def preload_sources(config: NeuronConfig, known: Sequence[ModelSpec] = ()) -> None:
    """`MODEL=SOURCE` preload entries become catalogue entries; a bare id must be catalogued, so
    a typo fails at start in one line rather than in the neuron's start-up."""
    preload: list[str] = []
    for entry in config.neuron.preload:
        model, sep, source = entry.partition("=")
        if sep:
            config.models.append(ModelSpec(id=model.strip(), source=source.strip()))
        preload.append(model.strip())
    config.neuron.preload = preload
    catalogue = merge_catalogues(DEFAULT_CATALOGUE, list(known), config.models)
    for model in preload:
        if resolve_alias(catalogue, model) is None:
            problem = "is not in the catalogue: use --preload MODEL=SOURCE or a [[models]] entry"
            raise ConfigError(f"preload: {unknown_model(catalogue, model, problem)}")


def check_port(host: str, port: int, what: str) -> None:
    """Fail in one line when the port is taken, before uvicorn logs a traceback about it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise CortexError(f"{what} {host}:{port}: {reason}") from None


def check_gateway_ports(config: GatewayConfig) -> None:
    api, metrics = config.gateway.listen, config.gateway.metrics_listen
    if metrics:
        (api_host, api_port), (host, port) = _split_listen(api), _split_listen(metrics)
        wildcard = {"0.0.0.0", "::"}
        if api_port == port and (api_host == host or {api_host, host} & wildcard):
            raise CortexError(
                f"gateway.metrics_listen (--metrics-port) {metrics} is the API's {api}: pick "
                'another port, or set metrics_listen = "" to serve /metrics on the API port'
            )
    for what, listen in (
        ("gateway.listen (--port)", config.gateway.listen),
        ("gateway.metrics_listen (--metrics-port)", config.gateway.metrics_listen),
    ):
        if listen:
            check_port(*_split_listen(listen), what)


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)  # [::]:31313: bind() takes ::


def in_process_neuron(args: argparse.Namespace, known: Sequence[ModelSpec] = ()) -> NeuronConfig:
    """`cortex up`'s neuron, which also knows the gateway's catalogue (`known`): its lifecycle
    routes take a fresh random token unless one is set, so other local users cannot load or
    unload through its port."""
    config = neuron_config(args, known)
    if not config.neuron.admin_secret():
        config.neuron.admin_token = secrets.token_urlsafe(32)
    return config


@contextmanager
def needs_extra(command: str, *extras: str) -> Iterator[None]:
    """A library the command's extras bring is missing: say which extras, in one line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        which = " and ".join(extras) + (" extras" if len(extras) > 1 else " extra")
        raise CortexError(
            f"{command} needs the {which} (pip install 'cortex[{','.join(extras)}]'): {exc}"
        ) from None


async def serve(
    app: Any,
    host: str,
    port: int,
    drain: Drain | None = None,
    on_hangup: Callable[[], None] | None = None,
) -> None:
    """Run one ASGI app with uvicorn inside the current event loop; SIGTERM drains `drain` (the
    app's requests in flight) first, or stops at once without one; SIGHUP calls `on_hangup`."""
    import uvicorn

    from cortex.core.shutdown import Drain, GracefulServer
    from cortex.gateway.corked import CorkedHttpToolsProtocol

    # The gateway's server protocol: a request head past 64 KiB is 431 before it is all read.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", http=CorkedHttpToolsProtocol
    )
    redact_access_log()
    loop = asyncio.get_running_loop()
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await GracefulServer(config, drain or Drain(grace=0)).serve()
    finally:
        if on_hangup is not None:
            loop.remove_signal_handler(signal.SIGHUP)


async def neuron(args: argparse.Namespace) -> None:
    config = neuron_config(args)
    check_port(config.neuron.host, config.neuron.port, "neuron port (--port)")
    with needs_extra("neuron", "neuron"):  # torch: after the one-line checks
        from cortex.neuron.devices import discover
        from cortex.neuron.runtime import NeuronRuntime
        from cortex.neuron.server import create_app

    discover(config.neuron.cpu_memory, config.neuron.devices)  # a wrong device name: one line
    runtime = NeuronRuntime(config)
    app = create_app(runtime)  # the app's lifespan starts and stops the runtime
    # SIGHUP: neuron.toml (and the flags) read again, applied to the running neuron.
    reload = hangup_handler(lambda: neuron_config(args), runtime.reload)
    section = config.neuron
    await serve(RequestContext(app), section.host, section.port, app.state.drain, reload)


def operator(args: argparse.Namespace) -> int:
    """The kopf operator, until interrupted; kopf is imported only here."""
    with needs_extra("operator", "operator"):
        from cortex.operator.cli import check_credentials, config_from_args, run
    try:
        config = config_from_args(args)
        check_credentials()
    except (ValueError, OSError) as exc:
        print(f"cortex operator: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(config))
    return 0


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    config = load_gateway_config(Path(args.config).expanduser() if args.config else None)
    section = config.gateway
    bare = (args.host or "").strip("[]")
    flag_host = f"[{bare}]" if ":" in bare else bare  # --host :: listens on [::]:31313
    host, _, port = section.listen.rpartition(":")
    section.listen = f"{flag_host or host}:{args.port or port}"
    if section.metrics_listen and (args.host or args.metrics_port):
        # The metrics port has no key: --host moves it only where cortex.toml leaves it at its
        # default, never off an address the config chose for it (docs/security.md).
        chosen = "metrics_listen" in section.model_fields_set
        metrics_host, _, metrics_port = section.metrics_listen.rpartition(":")
        metrics_host = metrics_host if chosen else flag_host or metrics_host
        section.metrics_listen = f"{metrics_host}:{args.metrics_port or metrics_port}"
    return config


def kubernetes_login(
    args: argparse.Namespace, config: GatewayConfig, environ: Mapping[str, str] = os.environ
) -> kube_api.KubeLogin | None:
    """Where the CRDs are, for `--kubernetes` or a pod with no [[neurons]] configured; None for
    a static fleet. The namespace: --namespace / CORTEX_NAMESPACE, else the login's own."""
    in_cluster = bool(environ.get("KUBERNETES_SERVICE_HOST")) and not config.neurons
    if not (args.kubernetes or in_cluster):
        return None
    try:
        login = kube_api.login(environ)
    except kube_api.KubeApiError as exc:
        raise ConfigError(f"--kubernetes: {exc}") from None
    return dataclasses.replace(login, namespace=args.namespace or login.namespace)


async def gateway(args: argparse.Namespace) -> None:
    with needs_extra("gateway", "gateway"):
        from cortex.gateway.app import serve as serve_gateway

    config = gateway_config(args)
    check_gateway_ports(config)
    kubernetes = kubernetes_login(args, config)
    if kubernetes is None and not config.neurons:
        warning = "no [[neurons]] in the config; `cortex up` runs a local one"
        if json_logs():
            log.warning(warning)
        else:
            print(f"cortex gateway: {warning}", file=sys.stderr)
    catalogue = merge_catalogues(DEFAULT_CATALOGUE, config.models)
    announce(config, args.config, catalogue)
    # The built-in models go as the base a reload keeps; the config's come with the config.
    await serve_gateway(
        config, DEFAULT_CATALOGUE, kubernetes=kubernetes, reread=lambda: gateway_config(args)
    )


async def up(args: argparse.Namespace) -> None:
    """Gateway plus an in-process neuron on a private loopback port: one command, one machine."""
    config = gateway_config(args)
    check_gateway_ports(config)
    with needs_extra("up", "gateway", "neuron"):  # torch: after the one-line checks
        import uvicorn

        from cortex.core.shutdown import SilentServer
        from cortex.gateway.app import serve as serve_gateway
        from cortex.gateway.corked import CorkedHttpToolsProtocol
        from cortex.neuron.runtime import NeuronRuntime
        from cortex.neuron.server import create_app

    catalogue = merge_catalogues(DEFAULT_CATALOGUE, config.models)
    local = in_process_neuron(args, catalogue)
    if any(entry.name == local.neuron.name for entry in config.neurons):
        raise CortexError(
            f"neurons: {local.neuron.name!r} is the name of cortex up's own neuron; give the "
            "[[neurons]] entry another name, or the local one ([neuron] name in --neuron-config)"
        )
    local.models = merge_catalogues(catalogue, local.models)
    runtime = NeuronRuntime(local, catalogue=[])
    await runtime.start()
    await runtime.preloaded()  # the banner means the preloaded models answer
    port = free_port()
    entry = local_entry(local, port)
    server = SilentServer(  # the gateway's servers take the signals, and stop it
        uvicorn.Config(
            RequestContext(create_app(runtime, manage_runtime=False)),
            "127.0.0.1",
            port,
            log_level="warning",
            http=CorkedHttpToolsProtocol,
        )
    )
    redact_access_log()
    neuron_task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # the gateway's first poll must find the neuron answering
            if neuron_task.done():
                await neuron_task
                raise CortexError(f"the local neuron could not listen on 127.0.0.1:{port}")
            await asyncio.sleep(0.05)
        announce(config, args.config, catalogue)

        async def reload_neuron(new: GatewayConfig) -> list[str]:
            # The neuron serves the gateway's catalogue (its file: models are allowed paths);
            # its admin token stays the one the gateway holds.
            fresh = neuron_config(args, merge_catalogues(DEFAULT_CATALOGUE, new.models))
            fresh.neuron.admin_token = fresh.neuron.admin_token or local.neuron.admin_token
            fresh.models = merge_catalogues(DEFAULT_CATALOGUE, new.models, fresh.models)
            changes = await runtime.reload(fresh)
            return [f"local neuron: {line}" for line in changes if line]

        await serve_gateway(
            config,
            DEFAULT_CATALOGUE,
            extra_neurons=[entry],
            reread=lambda: gateway_config(args),
            reload_first=reload_neuron,
        )
    finally:
        server.should_exit = True
        await asyncio.gather(neuron_task, return_exceptions=True)
        await runtime.stop()


def announce(config: GatewayConfig, path: str | None, catalogue: list[ModelSpec]) -> None:
    """The banner on stdout, or under --log-format json one log record holding its fields."""
    if json_logs():
        log.info(READY, extra={"fields": banner_fields(config, path, catalogue)})
    else:
        print(banner(config, path, catalogue), flush=True)


READY = "cortex gateway ready"


def banner_fields(
    config: GatewayConfig, path: str | None, catalogue: list[ModelSpec]
) -> dict[str, Any]:
    """What a user needs on start: where the API, the page and the metrics are, which config is
    in use (None: the defaults), and what models there are."""
    listen = config.gateway.listen
    return {
        "api": f"http://{listen}/v1",
        "web_page": f"http://{listen}/",
        "metrics": f"http://{config.gateway.metrics_listen or listen}/metrics",
        "config": str(Path(path).expanduser().resolve()) if path else None,
        "models": [{"id": spec.id, "kind": spec.kind} for spec in catalogue],
    }


def banner(config: GatewayConfig, path: str | None, catalogue: list[ModelSpec]) -> str:
    """The banner as a user reads it in a terminal."""
    fields = banner_fields(config, path, catalogue)
    lines = [
        f"cortex gateway  API      {fields['api']}",
        f"                web page {fields['web_page']}",
        f"                metrics  {fields['metrics']}",
        f"                config   {fields['config'] or '(defaults)'}",
    ]
    lines += [f"                model    {m['id']} ({m['kind']})" for m in fields["models"]]
    return "\n".join(lines)


def local_entry(local: NeuronConfig, port: int) -> NeuronEntry:
    """The gateway's entry for `cortex up`'s neuron, holding the token its lifecycle routes need."""
    return NeuronEntry(
        name=local.neuron.name,
        endpoint=f"http://127.0.0.1:{port}",
        admin_token=local.neuron.admin_secret(),
    )


async def status(endpoint: str, api_key: str | None = None, watch: float | None = None) -> int:
    """Every model from a gateway's admin API (an admin key when auth is on), or the fleet table
    from a neuron's /status."""
    if await identify(endpoint, api_key) == "gateway":
        admin = GatewayAdmin(endpoint, api_key=api_key)
        try:
            return await fleet_control.status(admin, watch)
        except (Unauthorized, Forbidden):
            print(f"cortex: {endpoint}/fleet needs an admin key (--api-key)", file=sys.stderr)
            return 1
        finally:
            await admin.aclose()
    client = NeuronClient(endpoint)
    try:
        found = await client.status()
    finally:
        await client.aclose()
    print_fleet([NeuronRow(found.node, endpoint, found.healthy, found)])
    return 0


def fleet_rows(view: FleetView) -> list[NeuronRow]:
    """The neurons of a gateway's GET /fleet as table rows."""
    return [
        NeuronRow(
            name=neuron.name,
            endpoint=neuron.endpoint,
            healthy=neuron.healthy,
            status=NeuronStatus(
                node=neuron.name,
                version="",
                devices=neuron.devices,
                models=[LoadedModel(source="", **r.model_dump()) for r in neuron.replicas],
            ),
        )
        for neuron in view.neurons
    ]


async def keys(endpoint: str, api_key: str | None, reset: str | None = None) -> int:
    """`cortex keys`: a gateway's API keys through its admin API; `reset NAME` forgets a key's
    spend."""
    if await identify(endpoint, api_key, "gateway") == "neuron":
        raise CortexError(f"{endpoint} is a neuron: cortex keys needs a gateway's endpoint")
    admin = GatewayAdmin(endpoint, api_key=api_key)
    try:
        if reset is not None:
            return await fleet_control.reset_key(admin, reset)
        return await fleet_control.keys(admin)
    finally:
        await admin.aclose()


async def models(args: argparse.Namespace) -> int:
    """`cortex models` and `cortex neurons`: through a gateway's admin API, or to one neuron."""
    gateway_only = args.command == "neurons" or args.action in ("pin", "unpin")
    wanted = "gateway" if gateway_only else "gateway or neuron"
    if await identify(args.endpoint, args.api_key, wanted) == "gateway":
        admin = GatewayAdmin(args.endpoint, api_key=args.api_key)
        try:
            if args.command == "neurons":
                return await fleet_control.neurons(admin, args)
            return await fleet_control.models(admin, args)
        finally:
            await admin.aclose()
    if gateway_only:
        raise CortexError(f"{args.endpoint} is a neuron: {args.action} needs a gateway's endpoint")
    client = NeuronClient(args.endpoint, admin_token=args.admin_token)
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
                    f"{model.id:32} {shown_state(model.state):10} {model.memory_bytes / 2**20:8.0f} MiB  {','.join(model.devices)}"
                )
            loaded = {m.id for m in listing.loaded}
            for spec in listing.available:
                if spec.id not in loaded:
                    console.print(f"{spec.id:32} {NOT_LOADED:10} {spec.source}")
    finally:
        await client.aclose()
    return 0


# A load takes what its download and conversion take; Ctrl-C stops the wait, not the load.
LOAD_WAIT = 24 * 3600.0


async def _load_with_progress(
    client: NeuronClient, model: str, source: str | None, console: Console
) -> None:
    """The load waits on the neuron until the model is ready, or fails with the neuron's reason
    (a failed ad-hoc load leaves no record to read it from); /status moves the bar meanwhile."""
    request = LoadRequest(model=model, source=source)
    load = asyncio.create_task(client.load(request, timeout=LOAD_WAIT))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"loading {model}", total=1.0)
            # a human is watching a bar: this paces its redraws, it waits for no state
            while not (await asyncio.wait([load], timeout=0.25))[0]:
                current = [m for m in (await client.status()).models if m.id == model]
                if current:
                    progress.update(task, completed=current[0].progress)
            record = await load
            progress.update(task, completed=1.0)
    except CortexError as exc:
        raise CortexError(f"load of {model} failed: {exc}") from None
    finally:
        load.cancel()
    console.print(
        f"{record.id} ready on {', '.join(record.devices)} ({record.memory_bytes / 2**20:.0f} MiB)"
    )


def cache(args: argparse.Namespace) -> int:
    """`cortex cache list|prune`: the converted-weights cache."""
    from cortex.core import weights_cache

    cache_dir = Path(args.cache_dir or NeuronSection.model_fields["cache_dir"].default)
    if args.action == "prune":
        removed = weights_cache.prune(cache_dir, everything=args.all)
        freed = sum(c.size for c in removed) / 2**20
        print(f"removed {len(removed)} conversions ({freed:.0f} MiB)")
        return 0
    found = weights_cache.conversions(cache_dir)
    for conversion in found:
        mark = " (orphaned)" if conversion.orphaned else ""
        print(f"{conversion.path.name:40} {conversion.size / 2**20:8.0f} MiB{mark}")
        for source in conversion.sources:
            print(f"  {source}")
    if not found:
        print(f"no conversions in {weights_cache.converted_root(cache_dir)}")
    return 0


# The checkout this command runs from, if it runs from one (an editable install); an installed
# wheel holds no bench/ (docs/benchmarks.md).
CHECKOUT = Path(__file__).resolve().parents[3]


def bench(args: list[str]) -> int:
    """`python -m bench ARGS` in the checkout, from whatever directory: the benchmarks and their
    tools (aiohttp, matplotlib, LiteLLM: the dev extra) are a checkout's, not an install's."""
    if not (CHECKOUT / "bench" / "__main__.py").is_file():
        raise CortexError(
            "cortex bench runs the benchmarks of a source checkout (git clone, then `make bench` "
            "or `cortex bench NAME` there); this cortex is installed without them"
        )
    path = [str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.call([sys.executable, "-m", "bench", *args], env=env)
