"""Overload: `cortex up` under far more concurrent clients than its neuron admits.

`cortex up` serves the default chat model (preloaded; or `--model`/`--source`). At each level,
`c` clients send non-streamed chat completions back to back for `--seconds`; a client answered
429 or 503 waits the Retry-After it was given (at most 5 s) and tries again, as the SDKs do. The
first level is the neuron's capacity (its `max_running` clients); the others overload it (200 and
500 by default, against 32 running + 128 queued). Counted per level: answers by status, 503s for
a wrong reason (saying a neuron is down or unreachable while it is only busy), 429/503 without
Retry-After, requests not answered within their timeout, whether the gateway ever held the
neuron unhealthy or suspect (its /health, sampled), and goodput: completion tokens per second of
the 200 answers. Targets: no wrong-reason 503, the neuron never unhealthy, every request answered
in time with 200 or 429/503 + Retry-After, goodput at overload >= 90% of goodput at capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bench import machine
from bench.loadgen import Call, percentile, session
from bench.processes import ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GOODPUT_TARGET = 0.9
MAX_BACKOFF_S = 5.0
# What a 503 must never say while the neuron is merely busy.
WRONG_REASONS = ("no healthy neuron", "unreachable", "neuron_unavailable")


@dataclass
class Level:
    """One load level: what every request got, and what the gateway said of the neuron."""

    clients: int
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    wrong_503: int = 0
    missing_retry_after: int = 0
    timeouts: int = 0
    tokens: int = 0
    latencies_ok: list[float] = field(default_factory=list)
    unhealthy_samples: int = 0
    health_samples: int = 0
    unhealthy_seen: list[str] = field(default_factory=list)  # what the first few samples said

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.timeouts

    @property
    def goodput(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "latencies_ok"}
        data |= {
            "statuses": dict(self.statuses),
            "codes": dict(self.codes),
            "requests": self.requests,
            "goodput_tokens_per_s": round(self.goodput, 2),
            "p50_ok_s": round(percentile(self.latencies_ok, 50), 3),
            "p99_ok_s": round(percentile(self.latencies_ok, 99), 3),
        }
        return data


def cortex_up(workdir: Path, args: argparse.Namespace) -> ServerProcess:
    """`cortex up` with the model preloaded and the neuron's admission limits from `args`."""
    port, metrics_port = free_port(), free_port()
    neuron = workdir / "neuron.toml"
    lines = [
        "[neuron]",
        "name = 'local'",
        'devices = ["cpu-0"]',
        f"preload = ['{args.model}']",
        f"max_running = {args.max_running}",
        f"max_queue = {args.max_queue}",
        f"queue_timeout = {args.queue_timeout}",
    ]
    if args.cache_dir:
        lines.append(f"cache_dir = '{args.cache_dir}'")
    neuron.write_text("\n".join(lines) + "\n")
    gateway = workdir / "cortex.toml"
    text = "[gateway]\nload_timeout = 900\n"
    if args.source:
        text += f"[[models]]\nid = '{args.model}'\nsource = '{args.source}'\n"
    gateway.write_text(text)
    argv = [*cortex_cli(), "up", "--port", str(port), "--metrics-port", str(metrics_port)]
    argv += ["--config", str(gateway), "--neuron-config", str(neuron)]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    return ServerProcess(
        "cortex-up",
        argv,
        lambda client: _model_ready(client, args.model),
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        startup_timeout=900,
    )


def _model_ready(client: Any, model: str) -> bool:
    """The gateway is ready and its poll shows the preloaded model on the neuron."""
    if client.get("/readyz").status_code != 200:
        return False
    listed = client.get("/v1/models").json().get("data", [])
    return any(m["id"] == model and m.get("state") == "loaded" for m in listed)


def chat_call(base_url: str, model: str, max_tokens: int, index: int) -> Call:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Count from {index} onwards, in words."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return Call.json(base_url + "/v1/chat/completions", body)


async def _one(http: aiohttp.ClientSession, call: Call, level: Level, timeout: float) -> float:
    """Send one request, count its answer; returns how long to back off (0 after a 200)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with http.post(call.url, data=call.body, headers=call.headers) as response:
                body = await response.read()
                status = response.status
                retry_after = response.headers.get("retry-after")
    except (TimeoutError, aiohttp.ClientError):
        level.timeouts += 1
        return 1.0
    level.statuses[str(status)] += 1
    if status == 200:
        level.latencies_ok.append(time.perf_counter() - started)
        level.tokens += int(json.loads(body).get("usage", {}).get("completion_tokens", 0))
        return 0.0
    try:
        error = json.loads(body).get("error") or {}
    except ValueError:
        error = {}
    level.codes[f"{status} {error.get('code')}"] += 1
    if status == 503 and any(w in json.dumps(error) for w in WRONG_REASONS):
        level.wrong_503 += 1
    if status in (429, 503) and not retry_after:
        level.missing_retry_after += 1
    try:
        return min(MAX_BACKOFF_S, float(retry_after or 1.0))
    except ValueError:
        return 1.0


async def _watch_health(
    http: aiohttp.ClientSession, url: str, level: Level, stop: asyncio.Event
) -> None:
    """Sample the gateway's /health: any failure count against the neuron is a mark of outage."""
    while not stop.is_set():
        try:
            async with http.get(url + "/health") as response:
                report = await response.json()
            level.health_samples += 1
            neurons = report.get("neurons", {}).values()
            if any(not n["healthy"] or n["consecutive_failures"] for n in neurons):
                _unhealthy(level, json.dumps(report["neurons"]))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            _unhealthy(level, f"/health failed: {exc!r}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


def _unhealthy(level: Level, seen: str) -> None:
    level.unhealthy_samples += 1
    if len(level.unhealthy_seen) < 5:
        level.unhealthy_seen.append(seen)


async def run_level(base_url: str, clients: int, args: argparse.Namespace) -> Level:
    level = Level(clients)
    stop = asyncio.Event()
    async with session(clients + 1, timeout_s=args.timeout + 5) as http:
        watcher = asyncio.create_task(_watch_health(http, base_url, level, stop))
        started = time.perf_counter()
        end = started + args.seconds

        async def client(index: int) -> None:
            sent = 0
            while time.perf_counter() < end:
                call = chat_call(base_url, args.model, args.max_tokens, index * 1000 + sent)
                sent += 1
                backoff = await _one(http, call, level, args.timeout)
                if backoff:
                    await asyncio.sleep(min(backoff, max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(client(i) for i in range(clients)))
        level.seconds = time.perf_counter() - started
        stop.set()
        await watcher
    print(
        f"{clients} clients: {dict(level.statuses)}, timeouts {level.timeouts}, "
        f"goodput {level.goodput:.1f} tokens/s",
        flush=True,
    )
    return level


def verdicts(levels: list[Level]) -> list[str]:
    capacity, overloads = levels[0], levels[1:]
    wrong = sum(level.wrong_503 for level in levels)
    unhealthy = sum(level.unhealthy_samples for level in levels)
    missing = sum(level.missing_retry_after + level.timeouts for level in levels)
    ratios = [o.goodput / capacity.goodput if capacity.goodput else 0.0 for o in overloads]
    worst = min(ratios, default=1.0)
    return [
        f"target 0 wrong-reason 503s: {wrong} ({'met' if wrong == 0 else 'MISSED'})",
        f"target neuron never unhealthy: {unhealthy} unhealthy samples "
        f"({'met' if unhealthy == 0 else 'MISSED'})",
        f"target every request answered in time, refusals with Retry-After: {missing} not "
        f"({'met' if missing == 0 else 'MISSED'})",
        f"target goodput at overload >= {GOODPUT_TARGET:.0%} of capacity: worst {worst:.0%} "
        f"({'met' if worst >= GOODPUT_TARGET else 'MISSED'})",
    ]


def rows(levels: list[Level]) -> list[list[object]]:
    capacity = levels[0].goodput or 1.0
    table = []
    for level in levels:
        statuses = level.statuses
        other = sum(v for k, v in statuses.items() if k not in ("200", "429", "503"))
        table.append(
            [
                level.clients,
                level.requests,
                statuses["200"],
                statuses["429"],
                statuses["503"],
                level.wrong_503,
                other,
                level.timeouts,
                level.missing_retry_after,
                level.unhealthy_samples,
                round(level.goodput, 1),
                f"{level.goodput / capacity:.0%}",
            ]
        )
    return table


COLUMNS = [
    "clients",
    "requests",
    "200",
    "429",
    "503",
    "wrong 503",
    "other",
    "timed out",
    "no Retry-After",
    "unhealthy samples",
    "goodput tok/s",
    "vs capacity",
]


def draw(levels: list[Level]) -> Any:
    def plot(figure: Figure) -> None:
        left, right = figure.subplots(1, 2)
        labels = [str(level.clients) for level in levels]
        bottom = [0] * len(levels)
        for status, colour in (("200", "tab:green"), ("429", "tab:orange"), ("503", "tab:red")):
            counts = [level.statuses[status] for level in levels]
            left.bar(labels, counts, bottom=bottom, label=status, color=colour)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        left.set_xlabel("concurrent clients")
        left.set_ylabel("answers")
        left.set_title("answers by status")
        left.legend()
        right.bar(labels, [level.goodput for level in levels], color="tab:blue")
        right.axhline(levels[0].goodput * GOODPUT_TARGET, color="grey", linestyle="--")
        right.set_xlabel("concurrent clients")
        right.set_ylabel("completion tokens/s")
        right.set_title(f"goodput (dashed: {GOODPUT_TARGET:.0%} of capacity)")

    return plot


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench overload", description=__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--seconds", type=float, default=45.0, help="per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=128)
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    parser.add_argument("--source", help="the model's source, for a model not in the catalogue")
    parser.add_argument("--cache-dir", help="the neuron's converted-weights cache")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the neuron (OMP_NUM_THREADS); its default"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: levels 4 and 12, 1 s each, limits 2 + 2"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.seconds, args.max_tokens = [4, 12], 1.0, 4
        args.max_running, args.max_queue = 2, 2
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(threads=args.threads, **machine.versions("cortex", "torch"))
    watch = machine.CpuWatch()
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        server = cortex_up(Path(tmp), args)
        with server:
            levels = [
                asyncio.run(run_level(server.base_url, clients, args))
                for clients in [args.max_running, *args.levels]
            ]
    publish(
        Report(
            name="overload",
            title=f"Overload: cortex up, {args.max_running} running + {args.max_queue} queued, "
            f"max_tokens {args.max_tokens}",
            columns=COLUMNS,
            rows=rows(levels),
            data={
                "machine": info,
                "settings": {k: v for k, v in vars(args).items() if k != "quick"},
                "levels": [level.summary() for level in levels],
            },
            notes=[*verdicts(levels), machine.cpu_note({"run": watch.shares()})],
            draw=draw(levels),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
