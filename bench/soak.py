"""Soak: 10,000 requests through a `cortex gateway`, the gateway's and the neuron's memory sampled.

The neuron is the stub backend by default (so that only the gateway's own memory moves), or with
`--backend neuron` a real `cortex neuron` serving the default chat model. Both run as child
processes; this process sends a mix of every dialect, streamed and not, from `--concurrency`
workers and samples each process group's resident memory (VmRSS summed, so a neuron's device
workers count) every `--every` requests. Growth is the last sample minus the sample at the end of warm-up: a gateway that keeps
something per request shows it as a slope. Target: gateway growth < 5 MiB after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import httpx

from bench import machine
from bench.gateway import MESSAGES, stub_server
from bench.loadgen import Call, LoadError, request, session
from bench.processes import ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from bench.stub_backend import STUB_MODEL
from cortex.core.catalogue import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET_MIB = 5.0
MIB = 2**20


def calls(base_url: str, model: str = STUB_MODEL, max_tokens: int = 16) -> list[Call]:
    """One of each: OpenAI chat, Anthropic messages and Responses, streamed and not."""
    chat = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens}
    responses = {"model": model, "input": "Say hello.", "max_output_tokens": max_tokens}
    bodies = [
        ("/v1/chat/completions", chat),
        ("/v1/messages", chat),
        ("/v1/responses", responses),
    ]
    return [
        Call.json(base_url + path, {**body, "stream": stream})
        for path, body in bodies
        for stream in (False, True)
    ]


def rss_bytes(group: int) -> int:
    """Resident memory of a server's process group now (VmRSS from /proc, summed)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            with (entry / "status").open() as status:
                total += next(
                    int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")
                )
        except (OSError, StopIteration):  # gone meanwhile, or a zombie without memory
            continue
    if not total:
        raise RuntimeError(f"no process of group {group} has memory")
    return total


@dataclass(frozen=True)
class Sample:
    requests: int  # answered so far
    seconds: float
    gateway_rss: int
    neuron_rss: int


@dataclass
class Soak:
    total: int
    warmup: int
    samples: list[Sample]
    errors: int
    seconds: float
    neuron: str  # what served: "neuron (stub)" or "neuron (<model>)"

    def at_warmup(self) -> Sample:
        return next(s for s in self.samples if s.requests >= self.warmup)

    def growth(self, field: str) -> float:
        """MiB from the end of warm-up to the last sample."""
        start: int = getattr(self.at_warmup(), field)
        end: int = getattr(self.samples[-1], field)
        return (end - start) / MIB

    def peak_growth(self, field: str) -> float:
        start: int = getattr(self.at_warmup(), field)
        after = [getattr(s, field) for s in self.samples if s.requests >= self.warmup]
        return (max(after) - start) / MIB


async def soak(
    base_url: str, gateway: ServerProcess, stub: ServerProcess, sizes: argparse.Namespace
) -> Soak:
    """`sizes.total` requests from `sizes.concurrency` workers, taking the calls in turn."""
    mix = calls(base_url, sizes.model, sizes.max_tokens)
    started = time.perf_counter()
    samples = [Sample(0, 0.0, rss_bytes(gateway.pid), rss_bytes(stub.pid))]
    next_index, done, errors = 0, 0, 0

    def sample() -> None:
        if done % sizes.every == 0 or done == sizes.total:
            elapsed = time.perf_counter() - started
            samples.append(Sample(done, elapsed, rss_bytes(gateway.pid), rss_bytes(stub.pid)))

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal next_index, done, errors
        while next_index < sizes.total:
            call = mix[next_index % len(mix)]
            next_index += 1
            try:
                await request(http, call)
            except (LoadError, aiohttp.ClientError, TimeoutError):
                errors += 1
            done += 1
            sample()

    async with session(sizes.concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(sizes.concurrency)))
    seconds = time.perf_counter() - started
    return Soak(sizes.total, sizes.warmup, samples, errors, seconds, neuron_label(sizes))


def neuron_label(sizes: argparse.Namespace) -> str:
    return "neuron (stub)" if sizes.backend == "stub" else f"neuron ({sizes.model})"


def neuron_server(port: int, workdir: Path, model: str) -> ServerProcess:
    """A real `cortex neuron` preloading `model`; ready once the model is."""
    config = workdir / "neuron.toml"
    config.write_text(f"[neuron]\nname = 'soak'\nport = {port}\npreload = ['{model}']\n")

    def ready(client: httpx.Client) -> bool:
        models = client.get("/status").json()["models"]
        return any(m["id"] == model and m["state"] == "ready" for m in models)

    argv = [*cortex_cli(), "neuron", "--config", str(config)]
    return ServerProcess("neuron", argv, ready, base_url=f"http://127.0.0.1:{port}")


def gateway_server(neuron_port: int, workdir: Path, model: str) -> ServerProcess:
    """`cortex gateway` over the one neuron; ready once a chat completion goes through."""
    port = free_port()
    config = workdir / "cortex.toml"
    config.write_text(
        f"[gateway]\nlisten = '127.0.0.1:{port}'\nmetrics_listen = ''\n"
        f"[[neurons]]\nname = 'soak'\nendpoint = 'http://127.0.0.1:{neuron_port}'\n"
    )
    body = {"model": model, "messages": MESSAGES, "max_tokens": 1}

    def ready(client: httpx.Client) -> bool:
        return client.post("/v1/chat/completions", json=body).status_code == 200

    argv = [*cortex_cli(), "gateway", "--config", str(config)]
    return ServerProcess("gateway", argv, ready, base_url=f"http://127.0.0.1:{port}")


def run(sizes: argparse.Namespace) -> Soak:
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        port = free_port()
        backend = (
            neuron_server(port, Path(tmp), sizes.model)
            if sizes.backend == "neuron"
            else stub_server(port)
        )
        with backend, gateway_server(port, Path(tmp), sizes.model) as gateway:
            print(f"soaking {gateway.base_url} with {sizes.total} requests ...", flush=True)
            return asyncio.run(soak(gateway.base_url, gateway, backend, sizes))


def draw(result: Soak) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        axes = figure.subplots()
        xs = [s.requests for s in result.samples]
        axes.plot(xs, [s.gateway_rss / MIB for s in result.samples], label="gateway")
        axes.plot(xs, [s.neuron_rss / MIB for s in result.samples], label=result.neuron)
        axes.axvline(result.warmup, color="grey", linestyle=":", label="end of warm-up")
        axes.set_xlabel("requests answered")
        axes.set_ylabel("RSS (MiB)")
        axes.legend()

    return plot


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--total", type=int, default=10_000, help="requests in all")
    parser.add_argument("--warmup", type=int, default=1_000, help="requests before the baseline")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--every", type=int, default=250, help="requests between two samples")
    parser.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument(
        "--backend", choices=("stub", "neuron"), default="stub", help="what the gateway routes to"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (16; neuron 4)")
    args = parser.parse_args(argv)
    args.model = STUB_MODEL if args.backend == "stub" else DEFAULT_CHAT_MODEL
    if args.max_tokens is None:
        args.max_tokens = 16 if args.backend == "stub" else 4
    if args.small:
        args.total, args.warmup, args.concurrency, args.every = 240, 60, 4, 30
    if not 0 < args.warmup < args.total:
        parser.error("--warmup must be between 0 and --total")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(**machine.versions("cortex", "fastapi", "uvicorn", "aiohttp"))
    result = run(args)
    growth = result.growth("gateway_rss")
    verdict = "met" if growth < TARGET_MIB else "NOT met"
    rows = [
        [
            name,
            getattr(result.at_warmup(), field) / MIB,
            getattr(result.samples[-1], field) / MIB,
            result.growth(field),
            result.peak_growth(field),
        ]
        for name, field in (("gateway", "gateway_rss"), (result.neuron, "neuron_rss"))
    ]
    notes = [
        f"target gateway RSS growth after warm-up < {TARGET_MIB:.0f} MiB: {growth:+.2f} MiB "
        f"-> {verdict}",
        f"{result.total} requests ({result.warmup} warm-up), {result.errors} errors, "
        f"{result.total / result.seconds:.0f} requests/s, concurrency {args.concurrency}",
    ]
    publish(
        Report(
            name="soak",
            title=f"Soak: gateway and neuron memory over {args.total:,} requests, "
            f"{args.backend} backend ({args.model})",
            columns=[
                "process",
                "RSS after warm-up MiB",
                "RSS at end MiB",
                "growth MiB",
                "peak growth MiB",
            ],
            rows=rows,
            data={
                "machine": info,
                "sizes": vars(args),
                "errors": result.errors,
                "seconds": result.seconds,
                "gateway_growth_mib": growth,
                "samples": [asdict(s) for s in result.samples],
            },
            notes=notes,
            draw=draw(result),
        )
    )
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
