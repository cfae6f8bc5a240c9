"""Soak: 10,000 requests through a `cortex gateway` over the stub backend, memory sampled.

The gateway and the stub (standing in for the neuron, so that only the gateway's own memory moves)
run as child processes; this process sends a mix of every dialect, streamed and not, from
`--concurrency` workers and samples both processes' resident memory (VmRSS) every `--every`
requests. Growth is the last sample minus the sample at the end of warm-up: a gateway that keeps
something per request shows it as a slope. Target: gateway growth < 5 MiB after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from bench import machine
from bench.gateway import MESSAGES, cortex_server, stub_server
from bench.loadgen import Call, LoadError, request, session
from bench.processes import ServerProcess, free_port
from bench.report import Report, publish
from bench.stub_backend import STUB_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET_MIB = 5.0
MIB = 2**20


def calls(base_url: str) -> list[Call]:
    """One of each: OpenAI chat, Anthropic messages and Responses, streamed and not."""
    chat = {"model": STUB_MODEL, "messages": MESSAGES, "max_tokens": 16}
    responses = {"model": STUB_MODEL, "input": "Say hello.", "max_output_tokens": 16}
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


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


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
    mix = calls(base_url)
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
    return Soak(sizes.total, sizes.warmup, samples, errors, time.perf_counter() - started)


def run(sizes: argparse.Namespace) -> Soak:
    with (
        tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp,
        stub_server(free_port()) as stub,
    ):
        stub_port = int(stub.base_url.rsplit(":", 1)[1])
        with cortex_server(stub_port, Path(tmp)) as gateway:
            print(f"soaking {gateway.base_url} with {sizes.total} requests ...", flush=True)
            return asyncio.run(soak(gateway.base_url, gateway, stub, sizes))


def draw(result: Soak) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        axes = figure.subplots()
        xs = [s.requests for s in result.samples]
        axes.plot(xs, [s.gateway_rss / MIB for s in result.samples], label="gateway")
        axes.plot(xs, [s.neuron_rss / MIB for s in result.samples], label="neuron (stub)")
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
    args = parser.parse_args(argv)
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
        for name, field in (("gateway", "gateway_rss"), ("neuron (stub)", "neuron_rss"))
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
            title="Soak: gateway and neuron memory over 10,000 requests (stub backend)"
            if not args.small
            else "Soak (small): gateway and neuron memory (stub backend)",
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
