"""P3 cold start: time from a request to its first token for a model that is not loaded.

`cortex up` (gateway + in-process neuron on cpu-0, nothing preloaded) is started with a fresh,
empty neuron cache_dir; a streamed chat completion for the default model makes the gateway load it
on demand (the GGUF is de-quantized and the converted weights saved under cache_dir). Then a
warm request shows the loaded model's own TTFT. The process is stopped and started again
`--repeats` times over the same cache_dir: those cold starts read the converted weights instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import machine
from bench.loadgen import Call, StreamResult, chat_stream, session
from bench.processes import ServerProcess, answers, cortex_cli, free_port
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CACHED_TARGET_S = 2.0  # issue 15 (round two); round one's was 5 s


@dataclass
class Start:
    """One process: its startup, its cold request and a warm one after it."""

    label: str
    startup_s: float
    cold: StreamResult
    warm: StreamResult


def cortex_up(cache_dir: Path, workdir: Path, threads: int | None) -> ServerProcess:
    port, metrics_port = free_port(), free_port()
    neuron = workdir / "neuron.toml"
    neuron.write_text(
        f'[neuron]\ndevices = ["cpu-0"]\ndtype = "float32"\ncache_dir = "{cache_dir}"\n'
    )
    gateway = workdir / "cortex.toml"
    gateway.write_text("[gateway]\nload_timeout = 900\n")  # a first conversion may be slow
    argv = [*cortex_cli(), "up", "--port", str(port), "--metrics-port", str(metrics_port)]
    argv += ["--config", str(gateway), "--neuron-config", str(neuron)]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    return ServerProcess(
        "cortex-up", argv, answers("/readyz"), base_url=f"http://127.0.0.1:{port}", env=env
    )


def chat_call(base_url: str, max_tokens: int) -> Call:
    body = {
        "model": DEFAULT_CHAT_MODEL,
        "messages": [{"role": "user", "content": "Say hello in one sentence."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call.json(base_url + "/v1/chat/completions", body)


async def one_start(label: str, server: ServerProcess, max_tokens: int) -> Start:
    with server:
        call = chat_call(server.base_url, max_tokens)
        async with session(1, timeout_s=1800) as http:
            cold = await chat_stream(http, call)
            warm = await chat_stream(http, call)
    assert server.startup_s is not None
    print(f"{label}: cold TTFT {cold.ttft:.2f} s, warm TTFT {warm.ttft * 1000:.0f} ms", flush=True)
    return Start(label, server.startup_s, cold, warm)


async def run(
    repeats: int, max_tokens: int, threads: int | None, cache: Path | None
) -> list[Start]:
    starts = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-coldstart-cache-") as scratch,
        tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp,
    ):
        cache_dir, workdir = cache or Path(scratch), Path(tmp)
        server = cortex_up(cache_dir, workdir, threads)
        starts.append(await one_start("first load (empty cache)", server, max_tokens))
        for index in range(repeats):
            server = cortex_up(cache_dir, workdir, threads)
            label = f"cached load #{index + 1} (new process)"
            starts.append(await one_start(label, server, max_tokens))
    return starts


def verdicts(starts: list[Start]) -> list[str]:
    cached = [s.cold.ttft for s in starts[1:]]
    if not cached:
        return []
    worst = max(cached)
    speedup = starts[0].cold.ttft / worst
    return [
        f"target cached cold start <= {CACHED_TARGET_S:.1f} s: worst {worst:.2f} s -> "
        f"{'met' if worst <= CACHED_TARGET_S else 'NOT met'} ({speedup:.1f}x faster than the first load)"
    ]


def draw(starts: list[Start]) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        axes = figure.subplots(1, 1)
        labels = [s.label.replace(" (", "\n(") for s in starts]
        xs = range(len(starts))
        axes.bar(list(xs), [s.cold.ttft for s in starts], label="cold request TTFT")
        axes.bar(list(xs), [s.warm.ttft for s in starts], label="warm request TTFT")
        axes.axhline(CACHED_TARGET_S, color="tab:red", ls="--", label="target (cached)")
        axes.set_xticks(list(xs), labels, fontsize=8)
        axes.set_ylabel("seconds")
        axes.legend()

    return plot


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench coldstart", description=__doc__)
    parser.add_argument("--repeats", type=int, default=2, help="cold starts from the filled cache")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="an empty directory to use as the neuron cache and keep (default: a temporary one)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.max_tokens = 1, 4
    if args.cache_dir is not None and args.cache_dir.exists() and any(args.cache_dir.iterdir()):
        parser.error(f"--cache-dir {args.cache_dir} is not empty: the first load would not be cold")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(
        threads=args.threads, **machine.versions("cortex", "torch", "transformers")
    )
    watch = machine.CpuWatch()
    starts = asyncio.run(run(args.repeats, args.max_tokens, args.threads, args.cache_dir))
    cpu = {"run": watch.shares()}
    rows = [
        [s.label, s.startup_s, s.cold.ttft, s.cold.ended - s.cold.started, s.warm.ttft * 1000]
        for s in starts
    ]
    columns = [
        "start",
        "process ready s",
        "cold TTFT s",
        "cold request total s",
        "warm TTFT ms",
    ]
    publish(
        Report(
            name="coldstart",
            title=f"P3 cold start: {DEFAULT_CHAT_MODEL} through `cortex up`, request to first token",
            columns=columns,
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": cpu,
                "sizes": {"repeats": args.repeats, "max_tokens": args.max_tokens},
                "starts": [
                    {
                        "label": s.label,
                        "startup_s": s.startup_s,
                        "cold_ttft_s": s.cold.ttft,
                        "cold_total_s": s.cold.ended - s.cold.started,
                        "warm_ttft_s": s.warm.ttft,
                    }
                    for s in starts
                ],
            },
            notes=[*verdicts(starts), machine.cpu_note(cpu)],
            draw=draw(starts),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
