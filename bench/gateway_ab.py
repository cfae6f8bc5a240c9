"""P1's gateway overhead, A/B: this checkout's `cortex gateway` against another commit's, side by side.

`python -m bench.gateway_ab --base DIR` (DIR: the other commit's tree, e.g. `git archive <commit> |
tar -x -C DIR`; it runs on this checkout's venv, with DIR's packages first on PYTHONPATH). Both
gateways front one stub backend (bench/stub_backend.py) and are measured request by request in
turn, so whatever else loads the machine hits both alike: on a shared box the ratio is the result,
not the milliseconds. Each scenario's p50 and p99 come from `--requests` sequential requests per
side; max requests/s from `--total` requests at `--concurrency`, the sides taking turns
`--rounds` times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bench import machine
from bench.gateway import SCENARIOS, cortex_server, stub_server
from bench.loadgen import Call, latencies, percentile, throughput
from bench.processes import free_port

PACKAGES = ("cli", "core", "gateway", "neuron-image", "operator")  # the source roots


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc): unlike wall time, it hardly moves
    when neighbours load the machine, so it is the steadier measure of the work per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def base_env(base: Path) -> dict[str, str]:
    """PYTHONPATH that puts the other tree's packages before this checkout's editable install."""
    paths = [str(base / p) for p in PACKAGES] + [str(base)]
    return {"PYTHONPATH": os.pathsep.join(paths)}


async def measure(urls: dict[str, str], args: argparse.Namespace) -> list[str]:
    lines = []
    for scenario in SCENARIOS:
        calls = [Call.json(url + scenario.path, scenario.body) for url in urls.values()]
        timings = await latencies(calls, args.requests, args.warmup)
        totals = {n: [t.total * 1e3 for t in ts] for n, ts in zip(urls, timings, strict=True)}
        p50 = {name: percentile(values, 50) for name, values in totals.items()}
        p99 = {name: percentile(values, 99) for name, values in totals.items()}
        rates: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, call in zip(urls, calls, strict=True):
                load = await throughput(call, args.total, args.concurrency, args.warmup)
                rates[name].append(load.per_second)
        best = {name: max(r) for name, r in rates.items()}
        lines.append(
            f"| {scenario.name} | {p50['base']:.2f} | {p50['this']:.2f} | "
            f"{p50['this'] / p50['base']:.2f} | {p99['base']:.2f} | {p99['this']:.2f} | "
            f"{best['base']:.0f} | {best['this']:.0f} | {best['this'] / best['base']:.2f} |"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_ab", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the other commit's tree")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--total", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    machine.describe(**machine.versions("cortex", "fastapi", "uvicorn", "aiohttp"))
    watch = machine.CpuWatch()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        stub = stub_server(free_port())
        with stub:
            port = int(stub.base_url.rsplit(":", 1)[1])
            base = cortex_server(port, Path(a))
            base.env.update(base_env(args.base.resolve()))
            this = cortex_server(port, Path(b))
            with base, this:
                urls = {"base": base.base_url, "this": this.base_url}
                pids = {"base": base.pid, "this": this.pid}
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                lines = asyncio.run(measure(urls, args))
                used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    print(
        "\n| scenario | p50 ms base | p50 ms this | p50 this/base | p99 ms base | p99 ms this "
        "| max req/s base | max req/s this | req/s this/base |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    served = len(SCENARIOS) * (
        args.requests + args.warmup + args.rounds * (args.total + args.warmup)
    )
    per_request = {name: seconds * 1e3 / served for name, seconds in used.items()}
    print(
        f"\ngateway CPU per request (all scenarios, {served} requests a side): "
        f"base {per_request['base']:.3f} ms, this {per_request['this']:.3f} ms, "
        f"this/base {per_request['this'] / per_request['base']:.2f}"
    )
    print(f"\n{machine.cpu_note({'run': watch.shares()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
