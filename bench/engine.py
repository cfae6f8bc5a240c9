"""P2 engine: tokens/s through the neuron's HTTP API at 1..32 concurrent streams, vs HF generate().

A `cortex neuron` process (cpu-0, float32, the default model preloaded) serves streamed greedy chat
completions; each of `c` clients sends `--rounds` requests back to back, so later requests join a
running batch (TTFT under load). The reference is Hugging Face `generate()` in this process on the
same weights (bench/hf_generate.py), timed while the neuron sits idle (its CPU time is recorded to
show it). First a curve: the neuron once at each level. Then `--trials` paired trials, each timing
back to back the neuron at `--batch` streams and a static `generate()` batch of that size, then one
stream each side taking turns request by request; the order alternates between trials. On a shared
machine two runs minutes apart differ by up to 20%, so each target is judged on the median of its
per-trial ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench import machine
from bench.hf_generate import Generated, generate, load_reference, one_stream
from bench.loadgen import Call, StreamResult, chat_stream, percentile, session
from bench.processes import ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CHAT_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOPICS = (
    "a dragon who learns to cook",
    "a robot that keeps a lighthouse",
    "two rival bakers in a small town",
    "a cat who becomes mayor",
    "a voyage to the bottom of the sea",
    "a library that is alive",
    "the last tree on a distant planet",
    "a detective who cannot remember yesterday",
    "a musician who hears colours",
    "a village built on the back of a turtle",
    "a clockmaker who can stop time",
    "an astronaut lost on the moon",
    "a garden that grows at night",
    "a friendly ghost in an old school",
    "a king who gives away his crown",
    "a river that flows uphill",
)
PROMPTS = tuple(f"Write a long, detailed story about {topic}." for topic in TOPICS)


@dataclass
class Level:
    """The neuron at one concurrency: every request's timing."""

    concurrency: int
    streams: list[StreamResult]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def per_stream_tokens_per_s(self) -> float:
        rates = [s.completion_tokens / (s.ended - s.started) for s in self.streams]
        return sum(rates) / len(rates)

    def ttft_ms(self, q: float) -> float:
        return percentile([s.ttft * 1000 for s in self.streams], q)


# ---- the neuron -------------------------------------------------------------------------------


def neuron_server(
    threads: int, max_running: int, cache_dir: Path | None, workdir: Path
) -> ServerProcess:
    port = free_port()
    config = workdir / "neuron.toml"
    lines = [
        "[neuron]",
        f"port = {port}",
        'devices = ["cpu-0"]',
        'dtype = "float32"',
        f"max_running = {max_running}",
    ]
    if cache_dir is not None:
        lines.append(f'cache_dir = "{cache_dir}"')
    config.write_text("\n".join(lines) + "\n")
    argv = [*cortex_cli(), "neuron", "--config", str(config), "--preload", DEFAULT_CHAT_MODEL]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return ServerProcess(
        "neuron",
        argv,
        _model_ready,
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        startup_timeout=900,
    )


def _model_ready(client: httpx.Client) -> bool:
    response = client.get("/status")
    return response.status_code == 200 and any(
        m["id"] == DEFAULT_CHAT_MODEL and m["state"] == "ready" for m in response.json()["models"]
    )


def chat_call(base_url: str, prompt: str, max_tokens: int) -> Call:
    body = {
        "model": DEFAULT_CHAT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call.json(base_url + "/v1/chat/completions", body)


async def run_level(
    base_url: str, concurrency: int, rounds: int, max_tokens: int, first: int = 0
) -> Level:
    """`concurrency` clients each send `rounds` requests back to back (prompts from `first` on)."""
    async with session(concurrency, timeout_s=1800) as http:

        async def client(index: int) -> list[StreamResult]:
            results = []
            for r in range(rounds):
                prompt = PROMPTS[(first + index * rounds + r) % len(PROMPTS)]
                results.append(await chat_stream(http, chat_call(base_url, prompt, max_tokens)))
            return results

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return Level(concurrency, [s for streams in per_client for s in streams], wall)


@dataclass
class Trial:
    """One back-to-back comparison: the neuron and generate(), batched and single stream."""

    batched_level: Level
    batched: Generated
    single_level: Level
    single: Generated

    def ratios(self) -> dict[str, float]:
        return {
            "aggregate / generate() single": self.batched_level.tokens_per_s
            / self.single.tokens_per_s,
            "aggregate / generate() batch": self.batched_level.tokens_per_s
            / self.batched.tokens_per_s,
            "single stream / generate() single": self.single_level.tokens_per_s
            / self.single.tokens_per_s,
        }


class Bench:
    """The neuron server and the in-process reference, measured in any order."""

    def __init__(self, args: argparse.Namespace, server: ServerProcess) -> None:
        import torch

        torch.set_num_threads(args.threads)
        self.args, self.server = args, server
        self.weights = load_reference(args.cache_dir)
        generate(self.weights, [PROMPTS[0]], 4)  # warm-up: first-call costs stay out
        asyncio.run(run_level(server.base_url, 1, 1, 4))
        self.neuron_cpu_while_generating = 0.0
        self.generating_s = 0.0

    def level(self, concurrency: int, rounds: int | None = None, first: int = 0) -> Level:
        args = self.args
        level = asyncio.run(
            run_level(
                self.server.base_url, concurrency, rounds or args.rounds, args.max_tokens, first
            )
        )
        print(
            f"neuron c={concurrency}: {level.tokens_per_s:.1f} tok/s, "
            f"TTFT p50 {level.ttft_ms(50):.0f} ms",
            flush=True,
        )
        return level

    def generate(self, prompts: list[str]) -> Generated:
        """One generate() call: a static batch, or one stream for a single prompt."""
        cpu = self.server.cpu_seconds()
        result = generate(self.weights, prompts, self.args.max_tokens)
        self.neuron_cpu_while_generating += self.server.cpu_seconds() - cpu
        self.generating_s += result.wall_s
        label = "single" if len(prompts) == 1 else f"batch {len(prompts)}"
        print(f"generate() {label}: {result.tokens_per_s:.1f} tok/s", flush=True)
        return result

    def single_streams(self, neuron_first: bool) -> tuple[Level, Generated]:
        """`rounds` prompts on one stream each side, taking turns request by request."""
        levels, runs = [], []
        for r in range(self.args.rounds):
            prompt = [PROMPTS[r % len(PROMPTS)]]
            if neuron_first == (r % 2 == 0):
                levels.append(self.level(1, rounds=1, first=r))
                runs.append(self.generate(prompt))
            else:
                runs.append(self.generate(prompt))
                levels.append(self.level(1, rounds=1, first=r))
        streams = [s for level in levels for s in level.streams]
        return Level(1, streams, sum(level.wall_s for level in levels)), one_stream(runs)

    def trial(self, index: int) -> Trial:
        """Neuron first in even trials, generate() first in odd ones, so drift hits both."""
        batch = [PROMPTS[i % len(PROMPTS)] for i in range(self.args.batch)]
        if index % 2 == 0:
            batched_level, batched = self.level(len(batch)), self.generate(batch)
        else:
            batched, batched_level = self.generate(batch), self.level(len(batch))
        single_level, single = self.single_streams(neuron_first=index % 2 == 0)
        return Trial(batched_level, batched, single_level, single)


def median(values: list[float]) -> float:
    return percentile(values, 50)


# ---- report -----------------------------------------------------------------------------------

TARGETS = {
    "aggregate / generate() single": 8.0,
    "aggregate / generate() batch": 0.9,
    "single stream / generate() single": 1.0,
}


def verdicts(trials: list[Trial], batch: int) -> list[str]:
    """Each target on the median of its per-trial ratios, with every trial's value."""
    lines = []
    for name, target in TARGETS.items():
        values = [t.ratios()[name] for t in trials]
        value = median(values)
        label = name.replace("aggregate", f"aggregate@{batch}").replace("batch", f"batch {batch}")
        lines.append(
            f"target {label} >= {target}x: median {value:.2f}x "
            f"(trials {', '.join(f'{v:.2f}' for v in values)}) -> "
            f"{'met' if value >= target else 'NOT met'}"
        )
    return lines


def draw(levels: list[Level], trials: list[Trial]) -> Callable[[Figure], None]:
    single = median([t.single.tokens_per_s for t in trials])
    batched = median([t.batched.tokens_per_s for t in trials])
    batch = trials[0].batched.batch

    def plot(figure: Figure) -> None:
        rate, ttft = figure.subplots(1, 2)
        xs = [level.concurrency for level in levels]
        rate.plot(xs, [level.tokens_per_s for level in levels], "o-", label="neuron aggregate")
        rate.plot(
            [batch] * len(trials),
            [t.batched_level.tokens_per_s for t in trials],
            "x",
            color="tab:blue",
            label="neuron, paired trials",
        )
        rate.axhline(single, color="tab:red", ls="--", label="generate() single (median)")
        rate.axhline(
            batched, color="tab:purple", ls=":", label=f"generate() batch {batch} (median)"
        )
        rate.set_xscale("log", base=2)
        rate.set_xlabel("concurrent streams")
        rate.set_ylabel("tokens/s")
        rate.legend()
        ttft.plot(xs, [level.ttft_ms(50) for level in levels], "o-", label="p50")
        ttft.plot(xs, [level.ttft_ms(95) for level in levels], "s--", label="p95")
        ttft.set_xscale("log", base=2)
        ttft.set_xlabel("concurrent streams")
        ttft.set_ylabel("TTFT ms")
        ttft.legend()

    return plot


def level_row(label: str, level: Level, single: float) -> list[object]:
    return [
        label,
        level.tokens_per_s,
        level.per_stream_tokens_per_s,
        level.tokens,
        level.ttft_ms(50),
        level.ttft_ms(95),
        level.tokens_per_s / single,
    ]


def generated_row(label: str, g: Generated, single: float) -> list[object]:
    return [
        label,
        g.tokens_per_s,
        g.tokens_per_s / g.batch,
        g.tokens,
        g.ttft_ms or "-",
        "-",
        g.tokens_per_s / single,
    ]


def rows(levels: list[Level], trials: list[Trial]) -> list[list[object]]:
    """The curve against the median generate() single, then each trial against its own."""
    single = median([t.single.tokens_per_s for t in trials])
    table = [level_row(f"neuron, {lv.concurrency} streams", lv, single) for lv in levels]
    for i, t in enumerate(trials, 1):
        own = t.single.tokens_per_s
        table += [
            level_row(
                f"trial {i}: neuron, {t.batched_level.concurrency} streams", t.batched_level, own
            ),
            generated_row(f"trial {i}: generate() batch {t.batched.batch}", t.batched, own),
            level_row(f"trial {i}: neuron, 1 stream", t.single_level, own),
            generated_row(f"trial {i}: generate() single", t.single, own),
        ]
    return table


def parse(argv: list[str]) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__)
    parser.add_argument(
        "--levels", default="1,4,8,16,32", help="concurrent streams of the curve, comma separated"
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--batch", type=int, default=16, help="streams and static batch of the paired trials"
    )
    parser.add_argument("--trials", type=int, default=3, help="paired trials for the targets")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="neuron cache_dir (default its own)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.rounds, args.max_tokens, args.batch, args.trials = "1,2", 1, 8, 2, 1
    args.levels = [int(v) for v in str(args.levels).split(",")]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(
        threads=args.threads, **machine.versions("cortex", "torch", "transformers", "aiohttp")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    watch = machine.CpuWatch()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        server = neuron_server(
            args.threads, max(*args.levels, args.batch), args.cache_dir, Path(tmp)
        )
        with server:
            bench = Bench(args, server)
            levels = [bench.level(c) for c in args.levels]
            trials = [bench.trial(i) for i in range(args.trials)]
    cpu = {"whole run": watch.shares()}
    idle = (
        f"neuron process CPU while generate() ran: {bench.neuron_cpu_while_generating:.2f} s "
        f"over {bench.generating_s:.0f} s"
    )
    sizes = {k: v for k, v in vars(args).items() if k not in {"quick", "cache_dir"}}
    publish(
        Report(
            name="engine",
            title=f"P2 engine: neuron vs HF generate() ({DEFAULT_CHAT_MODEL}, float32, {args.threads} threads)",
            columns=[
                "run",
                "tok/s",
                "tok/s per stream",
                "tokens",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "x generate() single",
            ],
            rows=rows(levels, trials),
            data={
                "machine": info,
                "cpu_shares": cpu,
                "neuron_cpu_while_generating_s": bench.neuron_cpu_while_generating,
                "sizes": sizes,
                "levels": [level_data(level) for level in levels],
                "trials": [
                    {
                        "neuron_batched": level_data(t.batched_level),
                        "generate_batch": vars(t.batched),
                        "neuron_single": level_data(t.single_level),
                        "generate_single": vars(t.single),
                        "ratios": t.ratios(),
                    }
                    for t in trials
                ],
            },
            notes=[*verdicts(trials, args.batch), idle, machine.cpu_note(cpu)],
            draw=draw(levels, trials),
        )
    )
    return 0


def level_data(level: Level) -> dict[str, object]:
    return {
        "concurrency": level.concurrency,
        "tokens": level.tokens,
        "wall_s": level.wall_s,
        "tokens_per_s": level.tokens_per_s,
        "ttft_p50_ms": level.ttft_ms(50),
        "ttft_p95_ms": level.ttft_ms(95),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
