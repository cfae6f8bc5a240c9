"""The `cortex` command. Every flag that configures a server (up, neuron, gateway, operator) or
reaches one (--endpoint, --api-key) can also come from an environment variable (CORTEX_<FLAG>)
and, where it has one, from the config file; the flag wins, then the variable, then the file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cortex.core.access_log import configure_logging, json_logs
from cortex.core.config import ConfigError
from cortex.core.errors import CortexError

T = TypeVar("T")


def _env(name: str) -> str | None:
    """CORTEX_<NAME>, stripped: a variable filled from a Secret file often ends in a newline."""
    return os.environ.get(f"CORTEX_{name.upper().replace('-', '_')}", "").strip() or None


def _port(value: str) -> int:
    """A TCP port, checked here: out of range, bind() would end in a traceback."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def _again(parser: argparse.ArgumentParser, *names: str) -> None:
    """The command's connection flags, accepted after its action too (`cortex models list
    --endpoint URL`); absent there, they leave the command's values (flag or variable) alone."""
    for name in names:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _flag(parser: argparse.ArgumentParser, name: str, help: str, **kwargs: Any) -> None:
    """A flag whose default is CORTEX_<NAME> (shown in --help)."""
    env = f"CORTEX_{name.upper().replace('-', '_')}"
    parser.add_argument(f"--{name}", default=_env(name), help=f"{help} [env {env}]", **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex", description="Self-hosted LLM fleet gateway (OpenAI + Anthropic APIs)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=_env("log-format") or "text",
        help="json: one object per line with a request_id, for log collectors "
        "[env CORTEX_LOG_FORMAT]",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="gateway + an in-process neuron on this machine")
    _flag(up, "host", "listen address (default 127.0.0.1)")
    _flag(up, "port", "API port (default 31313)", type=_port)
    _flag(up, "metrics-port", "Prometheus port (default 31314)", type=_port)
    _flag(up, "config", "cortex.toml")
    _flag(up, "neuron-config", "neuron.toml for the in-process neuron")

    neuron = commands.add_parser("neuron", help="run the neuron daemon on this machine")
    _flag(neuron, "host", "listen address (default 127.0.0.1)")
    _flag(neuron, "port", "port (default 13131)", type=_port)
    _flag(neuron, "config", "neuron.toml")
    # No variable defaults here: a flag of either kind must win over a variable of the other
    # (commands.neuron_config reads the variables when neither flag is given).
    neuron.add_argument(
        "--admin-token",
        help="token required by load/unload (visible in ps: prefer the file) "
        "[env CORTEX_ADMIN_TOKEN]",
    )
    neuron.add_argument(
        "--admin-token-file", help="file holding the admin token [env CORTEX_ADMIN_TOKEN_FILE]"
    )
    neuron.add_argument(
        "--preload", nargs="*", default=_split(_env("preload")), metavar="MODEL[=SOURCE]",
        help="models to load at start; MODEL=SOURCE loads one no catalogue names "
        "(pkg:, file: or hf: source) [env CORTEX_PRELOAD, comma separated]",
    )  # fmt: skip

    gateway = commands.add_parser(
        "gateway",
        aliases=["serve"],  # the seed's name for it
        help="run the gateway over [[neurons]], or over the CRDs with --kubernetes",
    )
    _flag(gateway, "config", "cortex.toml")
    _flag(gateway, "host", "listen address (overrides [gateway].listen)")
    _flag(gateway, "port", "API port (overrides [gateway].listen)", type=_port)
    _flag(
        gateway, "metrics-port", "Prometheus port (overrides [gateway].metrics_listen)", type=_port
    )
    gateway.add_argument(
        "--kubernetes", action="store_true", default=_env("kubernetes") in _TRUE,
        help="take the fleet from the ModelPlacement and Neuron objects (on by itself in a "
        "cluster when cortex.toml has no [[neurons]]) [env CORTEX_KUBERNETES]",
    )  # fmt: skip
    _flag(gateway, "namespace", "namespace of those objects (default: the pod's, or the context's)")

    _operator_parser(commands)

    status = commands.add_parser("status", help="show the fleet (gateway or neuron endpoint)")
    _endpoint_flags(status)
    status.add_argument(
        "--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
        help="redraw every SECONDS (default 2) until interrupted",
    )  # fmt: skip

    _models_parser(commands)

    keys = commands.add_parser(
        "keys", help="the API keys, their budgets and what is left; reset a key's spend (gateway)"
    )
    _endpoint_flags(keys)
    keys_actions = keys.add_subparsers(dest="action", metavar="ACTION")
    listed = keys_actions.add_parser(
        "list", help="every key, its budget, what it spent and what is left"
    )
    reset = keys_actions.add_parser(
        "reset", help="forget what a key spent: its budget is whole again"
    )
    reset.add_argument("name", help="the key's name in [[auth.keys]]")
    for key_action in (listed, reset):
        _again(key_action, "endpoint", "api-key")

    neurons = commands.add_parser("neurons", help="cordon or uncordon a neuron (gateway)")
    _endpoint_flags(neurons)
    neuron_actions = neurons.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("cordon", "no new loads there"), ("uncordon", "loads there again")):
        cordon = neuron_actions.add_parser(action, help=text)
        cordon.add_argument("neuron")
        _again(cordon, "endpoint", "api-key")

    chat = commands.add_parser("chat", help="chat with a model through the gateway (/bye quits)")
    _endpoint_flags(chat, "gateway URL")
    chat.add_argument("model")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument(
        "--temperature", type=float, help="sampling temperature (0: greedy); default: the model's"
    )

    config = commands.add_parser("config", help="check a config file")
    config_actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = config_actions.add_parser(
        "check", help="validate cortex.toml, neuron.toml or models.toml and show what it means"
    )
    check.add_argument("file")

    cache = commands.add_parser("cache", help="the converted-weights (GGUF) cache")
    _flag(cache, "cache-dir", "cache directory (default ~/.cache/cortex)")
    cache_actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    cache_actions.add_parser("list", help="converted models, their size and source")
    prune = cache_actions.add_parser(
        "prune", help="remove conversions whose GGUF file is gone (--all: every conversion)"
    )
    prune.add_argument("--all", action="store_true", help="remove every conversion")

    bench = commands.add_parser("bench", help="run benchmarks (see bench/)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to `python -m bench`")
    return parser


_TRUE = ("1", "true", "yes", "on")
DEFAULT_ENDPOINT = "http://127.0.0.1:31313"


def _endpoint_flags(parser: argparse.ArgumentParser, what: str = "gateway or neuron URL") -> None:
    _flag(parser, "endpoint", f"{what} (default {DEFAULT_ENDPOINT})")
    _flag(parser, "api-key", "an API key (an admin one for fleet control), with [auth] on")


def _models_parser(commands: Any) -> None:
    models = commands.add_parser("models", help="list, load, unload, pin or unpin models")
    _endpoint_flags(models)
    _flag(models, "admin-token", "neuron admin token (with a neuron's endpoint)")
    actions = models.add_subparsers(dest="action", metavar="ACTION")
    listed = actions.add_parser("list", help="every model, where it is loaded, and until when")
    load = actions.add_parser("load", help="load a model, with a progress bar")
    load.add_argument("model")
    load.add_argument("--neuron", help="where (gateway; default: where the planner says)")
    load.add_argument("--source", help="pkg:, file: or hf: source (neuron endpoint only)")
    unload = actions.add_parser("unload", help="unload a model")
    unload.add_argument("model")
    unload.add_argument("--neuron", help="from this neuron only (gateway; default: everywhere)")
    unload.add_argument("--force", action="store_true", help="even with requests in flight")
    pins = []
    for action, text in (("pin", "keep it loaded there"), ("unpin", "let it go when idle")):
        pin = actions.add_parser(action, help=f"{text} (gateway)")
        pin.add_argument("model")
        pin.add_argument("--neuron", required=True)
        pins.append(pin)
    for parser in (listed, load, unload, *pins):
        _again(parser, "endpoint", "api-key", "admin-token")


OPERATOR_HELP = """\
Run the Kubernetes operator (kopf): it turns neuron pods into Neuron objects, probes every Neuron
and writes its status, and keeps each ModelPlacement's replicas loaded (docs/kubernetes.md).

Login: inside a pod, the pod's service account; outside the cluster, the kubeconfig (KUBECONFIG,
else ~/.kube/config, its current context). Neuron admin token: CORTEX_ADMIN_TOKEN, else the file
given with --admin-token-file. Needs the CRDs in crds/ installed (kubectl apply -f crds/).
"""


def _operator_parser(commands: Any) -> None:
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator (Neuron and ModelPlacement objects)",
        description=OPERATOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _flag(operator, "namespace", "namespace to serve (default: the pod's own, else default)")
    operator.add_argument(
        "--all-namespaces", action="store_true", default=_env("all-namespaces") in _TRUE,
        help="serve every namespace, each its own fleet [env CORTEX_ALL_NAMESPACES]",
    )  # fmt: skip
    _flag(
        operator, "neuron-selector",
        "labels of neuron pods, key=value[,...] (default app.kubernetes.io/name=cortex,"
        "app.kubernetes.io/component=neuron)",
    )  # fmt: skip
    _flag(operator, "admin-token-file", "file holding the neurons' admin token")
    _flag(
        operator, "probe-interval", "seconds between probes of each neuron (default 5)", type=float
    )
    _flag(operator, "peering", "kopf peering object (KopfPeering) shared by operator replicas")
    _flag(
        operator, "priority",
        "kopf peering priority: of the live peers the highest acts (default: random per process)",
        type=int,
    )  # fmt: skip
    operator.add_argument(
        "--standalone", action="store_true", default=_env("standalone") in _TRUE,
        help="no peering: this is the only operator [env CORTEX_STANDALONE]",
    )  # fmt: skip
    _flag(operator, "liveness", "kopf liveness endpoint (default http://0.0.0.0:8080/healthz; off)")
    _flag(operator, "metrics-port", "port of the operator's /metrics (default 31315; 0: off)")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # `cortex bench --list`: REMAINDER leaves a leading option out
        args.args = [*rest, *args.args]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return _dispatch(args)
    except (ConfigError, CortexError) as exc:
        if json_logs():
            logging.getLogger("cortex").error(str(exc))
        else:
            print(f"cortex: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Servers run on uvloop where it is installed (uvicorn[standard]): a faster event loop.
    Once they have stopped and cleaned up, the process ends as the signal that stopped them
    would have ended it (-15 for SIGTERM, 130 for Ctrl-C)."""
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    # After the run: a command whose extras are missing has said so in one line by now.
    from cortex.core.shutdown import exit_as_signalled

    exit_as_signalled()
    return result


def _endpoint(args: argparse.Namespace) -> str:
    from cortex.cli.endpoint import checked

    return checked(args.endpoint or DEFAULT_ENDPOINT)


def _dispatch(args: argparse.Namespace) -> int:
    from cortex.cli import commands

    if args.command == "up":
        _run(commands.up(args))
    elif args.command == "neuron":
        _run(commands.neuron(args))
    elif args.command in ("gateway", "serve"):
        _run(commands.gateway(args))
    elif args.command == "status":
        return asyncio.run(commands.status(_endpoint(args), args.api_key, args.watch))
    elif args.command == "keys":
        reset = getattr(args, "name", None)
        return asyncio.run(commands.keys(_endpoint(args), args.api_key, reset))
    elif args.command in ("models", "neurons"):
        args.endpoint = _endpoint(args)
        return asyncio.run(commands.models(args))
    elif args.command == "chat":
        from cortex.cli.chat import chat

        return chat(_endpoint(args), args.model, args.api_key, args.system, args.temperature)
    elif args.command == "operator":
        return commands.operator(args)
    elif args.command == "config":
        from cortex.cli.config_check import check

        print("\n".join(check(Path(args.file))))
    elif args.command == "cache":
        return commands.cache(args)
    elif args.command == "bench":
        return commands.bench(args.args)
    return 0
