"""P2 engine: tokens/s through the neuron's HTTP API at 1..32 concurrent streams, vs HF generate().

Two phases that never share the cores: first a `cortex neuron` process (cpu-0, float32, the default
model preloaded) serves streamed greedy chat completions at each concurrency level, each of `c`
clients sending `--rounds` requests back to back (so later requests join a running batch: TTFT
under load); then the neuron stops and this process loads the same weights through the neuron's
own loader and times Hugging Face `generate()` (greedy, same prompts, max tokens and torch threads)
on one stream and on a static left-padded batch.
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
from typing import TYPE_CHECKING, Any

import httpx

from bench import machine
from bench.loadgen import Call, StreamResult, chat_stream, percentile, session
from bench.processes import ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CATALOGUE, DEFAULT_CHAT_MODEL

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


@dataclass
class Generated:
    """HF generate() on `batch` prompts at once."""

    batch: int
    tokens: int
    wall_s: float
    ttft_ms: float | None = None  # single stream only (a streamer sees batch 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


# ---- phase 1: the neuron ----------------------------------------------------------------------


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


async def run_level(base_url: str, concurrency: int, rounds: int, max_tokens: int) -> Level:
    async with session(concurrency, timeout_s=1800) as http:

        async def client(index: int) -> list[StreamResult]:
            results = []
            for r in range(rounds):
                prompt = PROMPTS[(index * rounds + r) % len(PROMPTS)]
                results.append(await chat_stream(http, chat_call(base_url, prompt, max_tokens)))
            return results

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return Level(concurrency, [s for streams in per_client for s in streams], wall)


async def run_neuron(
    server: ServerProcess, levels: list[int], rounds: int, max_tokens: int
) -> list[Level]:
    results = []
    with server:
        await run_level(
            server.base_url, 1, 1, 4
        )  # warm-up: first-call costs stay out of the numbers
        for concurrency in levels:
            level = await run_level(server.base_url, concurrency, rounds, max_tokens)
            print(
                f"neuron c={concurrency}: {level.tokens_per_s:.1f} tok/s, "
                f"TTFT p50 {level.ttft_ms(50):.0f} ms",
                flush=True,
            )
            results.append(level)
    return results


# ---- phase 2: HF generate() in this process ---------------------------------------------------


def load_reference(cache_dir: Path | None) -> Any:
    """The default model through the neuron's own loader: same files, same dtype, same class."""
    from cortex.core.config import NeuronSection
    from cortex.neuron import loader, sources
    from cortex.neuron.devices import discover

    spec = next(s for s in DEFAULT_CATALOGUE if s.id == DEFAULT_CHAT_MODEL)
    cache = cache_dir or NeuronSection().cache_dir
    devices = discover(only=["cpu-0"])
    return loader.load_weights(
        sources.resolve(spec.source), "chat", devices, "float32", cache, lambda _: None
    )


def prompt_ids(weights: Any, prompt: str) -> list[int]:
    """As the neuron tokenizes a one-message chat."""
    from cortex.neuron.chat_template import render_chat

    text = render_chat(weights.tokenizer, [{"role": "user", "content": prompt}], None)
    return list(weights.tokenizer.encode(text, add_special_tokens=False))


def _generated_tokens(row: list[int], eos: set[int], pad: int) -> int:
    """Tokens up to (not counting) the first end-of-sequence: what the neuron would report."""
    count = 0
    for token in row:
        if token in eos or token == pad:
            break
        count += 1
    return count


def generate(weights: Any, prompts: list[str], max_tokens: int) -> Generated:
    """One generate() call over `prompts` as a static batch, left-padded, greedy."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    eos = weights.eos_token_ids
    pad = weights.tokenizer.pad_token_id
    pad = pad if pad is not None else min(eos)
    rows = [prompt_ids(weights, p) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    seen: list[float] = []

    class FirstToken(BaseStreamer):  # type: ignore[misc]
        def put(self, value: Any) -> None:
            seen.append(time.perf_counter())  # first put is the prompt, the second the first token

        def end(self) -> None:
            pass

    streamer = FirstToken() if len(prompts) == 1 else None
    started = time.perf_counter()
    with torch.inference_mode():
        output = weights.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            streamer=streamer,
        )
    wall = time.perf_counter() - started
    new = output[:, width:].tolist()
    tokens = sum(_generated_tokens(row, eos, pad) for row in new)
    ttft = (seen[1] - started) * 1000 if len(seen) > 1 else None
    return Generated(len(prompts), tokens, wall, ttft)


def run_generate(
    threads: int, cache_dir: Path | None, rounds: int, batch: int, max_tokens: int
) -> tuple[Generated, Generated]:
    """Single stream (`rounds` prompts one after another, summed) and one static batch."""
    import torch

    torch.set_num_threads(threads)
    weights = load_reference(cache_dir)
    generate(weights, [PROMPTS[0]], 4)  # warm-up
    singles = [generate(weights, [PROMPTS[i % len(PROMPTS)]], max_tokens) for i in range(rounds)]
    single = Generated(
        1,
        sum(g.tokens for g in singles),
        sum(g.wall_s for g in singles),
        percentile([g.ttft_ms for g in singles if g.ttft_ms is not None], 50),
    )
    print(f"generate() single: {single.tokens_per_s:.1f} tok/s", flush=True)
    batched = generate(weights, [PROMPTS[i % len(PROMPTS)] for i in range(batch)], max_tokens)
    print(f"generate() batch {batch}: {batched.tokens_per_s:.1f} tok/s", flush=True)
    return single, batched


# ---- report -----------------------------------------------------------------------------------


def verdicts(levels: list[Level], single: Generated, batched: Generated) -> list[str]:
    by_c = {level.concurrency: level for level in levels}
    lines = []

    def check(label: str, value: float, target: float) -> None:
        lines.append(
            f"target {label} >= {target}x: {value:.2f}x -> {'met' if value >= target else 'NOT met'}"
        )

    if 16 in by_c:
        check("aggregate@16 / generate() single", by_c[16].tokens_per_s / single.tokens_per_s, 8.0)
        if batched.batch == 16:
            check(
                "aggregate@16 / generate() batch 16",
                by_c[16].tokens_per_s / batched.tokens_per_s,
                0.9,
            )
    if 1 in by_c:
        check("single stream / generate() single", by_c[1].tokens_per_s / single.tokens_per_s, 1.0)
    return lines


def draw(levels: list[Level], single: Generated, batched: Generated) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        rate, ttft = figure.subplots(1, 2)
        xs = [level.concurrency for level in levels]
        rate.plot(xs, [level.tokens_per_s for level in levels], "o-", label="neuron aggregate")
        rate.axhline(single.tokens_per_s, color="tab:red", ls="--", label="generate() single")
        rate.axhline(
            batched.tokens_per_s,
            color="tab:purple",
            ls=":",
            label=f"generate() batch {batched.batch}",
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


def parse(argv: list[str]) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__)
    parser.add_argument(
        "--levels", default="1,4,8,16,32", help="concurrent streams, comma separated"
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="static batch for generate()")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="neuron cache_dir (default its own)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.rounds, args.max_tokens, args.batch = "1,2", 1, 8, 2
    args.levels = [int(v) for v in str(args.levels).split(",")]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(
        threads=args.threads, **machine.versions("cortex", "torch", "transformers", "aiohttp")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        watch = machine.CpuWatch()
        server = neuron_server(args.threads, max(args.levels), args.cache_dir, Path(tmp))
        levels = asyncio.run(run_neuron(server, args.levels, args.rounds, args.max_tokens))
        cpu = {"neuron": watch.shares()}
    watch = machine.CpuWatch()
    single, batched = run_generate(
        args.threads, args.cache_dir, args.rounds, args.batch, args.max_tokens
    )
    cpu["generate"] = watch.shares()
    rows: list[list[object]] = [
        [
            f"neuron, {level.concurrency} streams",
            level.tokens_per_s,
            level.per_stream_tokens_per_s,
            level.tokens,
            level.ttft_ms(50),
            level.ttft_ms(95),
            level.tokens_per_s / single.tokens_per_s,
        ]
        for level in levels
    ]
    for label, g in (("generate() single", single), (f"generate() batch {batched.batch}", batched)):
        rows.append(
            [
                label,
                g.tokens_per_s,
                g.tokens_per_s / g.batch,
                g.tokens,
                g.ttft_ms or "-",
                "-",
                g.tokens_per_s / single.tokens_per_s,
            ]
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
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": cpu,
                "sizes": sizes,
                "levels": [
                    {
                        "concurrency": level.concurrency,
                        "tokens": level.tokens,
                        "wall_s": level.wall_s,
                        "tokens_per_s": level.tokens_per_s,
                        "ttft_p50_ms": level.ttft_ms(50),
                        "ttft_p95_ms": level.ttft_ms(95),
                    }
                    for level in levels
                ],
                "generate": {"single": vars(single), "batch": vars(batched)},
            },
            notes=[*verdicts(levels, single, batched), machine.cpu_note(cpu)],
            draw=draw(levels, single, batched),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
