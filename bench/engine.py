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
from pathlib import Path

import httpx

from bench import engine_mixed as mixed
from bench import machine
from bench.engine_results import Level, Trial, draw, level_data, rows, verdicts
from bench.hf_generate import Generated, generate, load_reference, one_stream
from bench.loadgen import Call, StreamResult, chat_stream, session
from bench.processes import ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CHAT_MODEL

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


# ---- the neuron -------------------------------------------------------------------------------


def neuron_server(
    threads: int,
    max_running: int,
    cache_dir: Path | None,
    workdir: Path,
    settings: dict[str, int] | None = None,
) -> ServerProcess:
    """A `cortex neuron` on cpu-0 in float32, default model preloaded; `settings` go to [neuron]."""
    port = free_port()
    config = workdir / "neuron.toml"
    lines = [
        "[neuron]",
        f"port = {port}",
        'devices = ["cpu-0"]',
        'dtype = "float32"',
        f"max_running = {max_running}",
        *(f"{key} = {value}" for key, value in (settings or {}).items()),
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


# The sampled scenario: what most clients send, with a seed per request (same output each run).
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def chat_call(base_url: str, prompt: str, max_tokens: int, seed: int | None = None) -> Call:
    """Greedy, or SAMPLED with `seed` when one is given."""
    sampling = {"temperature": 0} if seed is None else {**SAMPLED, "seed": seed}
    body = {
        "model": DEFAULT_CHAT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        **sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call.json(base_url + "/v1/chat/completions", body)


async def run_level(
    base_url: str,
    concurrency: int,
    rounds: int,
    max_tokens: int,
    first: int = 0,
    sampled: bool = False,
) -> Level:
    """`concurrency` clients each send `rounds` requests back to back (prompts from `first` on),
    greedy or `sampled` (one seed per request)."""
    async with session(concurrency, timeout_s=1800) as http:

        async def client(index: int) -> list[StreamResult]:
            results = []
            for r in range(rounds):
                at = first + index * rounds + r
                call = chat_call(
                    base_url, PROMPTS[at % len(PROMPTS)], max_tokens, at if sampled else None
                )
                results.append(await chat_stream(http, call))
            return results

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return Level(concurrency, [s for streams in per_client for s in streams], wall)


class Bench:
    """The neuron server and the in-process reference, measured in any order."""

    def __init__(self, args: argparse.Namespace, server: ServerProcess) -> None:
        import torch

        torch.set_num_threads(args.threads)
        self.args, self.server = args, server
        self.weights = load_reference(args.cache_dir, stock=True)  # generate() as shipped
        generate(self.weights, [PROMPTS[0]], 4)  # warm-up: first-call costs stay out
        asyncio.run(run_level(server.base_url, 1, 1, 4))
        self.neuron_cpu_while_generating = 0.0
        self.generating_s = 0.0

    def level(
        self, concurrency: int, rounds: int | None = None, first: int = 0, sampled: bool = False
    ) -> Level:
        args = self.args
        level = asyncio.run(
            run_level(
                self.server.base_url,
                concurrency,
                rounds or args.rounds,
                args.max_tokens,
                first,
                sampled,
            )
        )
        print(
            f"neuron c={concurrency}{' sampled' if sampled else ''}: "
            f"{level.tokens_per_s:.1f} tok/s, "
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
        """Neuron first in even trials, generate() first in odd ones, so drift hits both; the
        sampled streams sit between greedy and generate() (before greedy in odd trials)."""
        batch = [PROMPTS[i % len(PROMPTS)] for i in range(self.args.batch)]
        if index % 2 == 0:
            batched_level = self.level(len(batch))
            sampled_level = self.level(len(batch), sampled=True)
            batched = self.generate(batch)
        else:
            batched = self.generate(batch)
            sampled_level = self.level(len(batch), sampled=True)
            batched_level = self.level(len(batch))
        single_level, single = self.single_streams(neuron_first=index % 2 == 0)
        return Trial(batched_level, batched, single_level, single, sampled_level)


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
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="the mixed-workload scenario instead: --batch short streams beside long-context ones",
    )
    parser.add_argument(
        "--long-tokens",
        default="2000,6000",
        help="prompt tokens of the long streams (--mixed), comma separated",
    )
    parser.add_argument(
        "--long-max-tokens", type=int, default=512, help="max_tokens of the long streams"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.rounds, args.max_tokens, args.batch, args.trials = "1,2", 1, 8, 2, 1
        args.long_tokens, args.long_max_tokens = "300", 32
    args.long_tokens = [int(v) for v in str(args.long_tokens).split(",")]
    args.levels = [int(v) for v in str(args.levels).split(",")]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(
        threads=args.threads, **machine.versions("cortex", "torch", "transformers", "aiohttp")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.mixed:
        return run_mixed(args, info)
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
                        "neuron_sampled": level_data(t.sampled_level),
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


def run_mixed(args: argparse.Namespace, info: dict) -> int:
    """The mixed-workload scenario (engine_mixed.py): its own report, engine_mixed.json."""
    shorts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    longs = [mixed.long_prompt(tokens) for tokens in args.long_tokens]
    watch = machine.CpuWatch()
    kv_tokens = 4 * (sum(args.long_tokens) + args.long_max_tokens * len(longs))
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        server = neuron_server(
            args.threads,
            args.batch + len(longs),
            args.cache_dir,
            Path(tmp),
            {"kv_tokens": kv_tokens},
        )
        with server:
            asyncio.run(run_level(server.base_url, 1, 1, 4))  # warm-up
            trials = [mixed.trial(server.base_url, args, shorts, longs) for _ in range(args.trials)]
    steps = mixed.step_costs(args.cache_dir, args.threads, repeats=3 if args.quick else 15)
    print("decode step ms, KV MiB: " + ", ".join(f"{k}: {v}" for k, v in steps.items()), flush=True)
    cpu = {"whole run": watch.shares()}
    budget = 16384 - 16384 // 4  # the default kv_tokens, less its prefix share
    shapes = {
        "bench short stream (prompt 40, max_tokens 128)": (40, 128),
        "Claude Code, trimmed (prompt 364, max_tokens clamped to 7,828)": (364, 7828),
        "long context (prompt 6,000, max_tokens 256)": (6000, 256),
    }
    reach = {name: mixed.reachable(p, m, budget) for name, (p, m) in shapes.items()}
    shorts_ratios = [t["shorts_ratio"] for t in trials]
    shorts_ratio = mixed.median(shorts_ratios)
    long_ratios = [mixed.median([t["longs_ratio"][i] for t in trials]) for i in range(len(longs))]
    notes = [
        f"target shorts mixed >= 0.95x alone: median {shorts_ratio:.2f}x "
        f"(trials {', '.join(f'{ratio:.2f}' for ratio in shorts_ratios)}) -> "
        f"{'met' if shorts_ratio >= 0.95 else 'NOT met'}",
        *(
            f"target long stream of {n} tokens, decode mixed >= 1.0x alone: median {r:.2f}x -> "
            f"{'met' if r >= 1.0 else 'NOT met'}"
            for n, r in zip(args.long_tokens, long_ratios, strict=True)
        ),
        *(
            f"reachable batch under the default KV budget ({budget} tokens), {name}: "
            f"before {r['before']}, after {r['after']} (at admission; it grows as they decode)"
            for name, r in reach.items()
        ),
        *(
            f"decode step, {name}: {ms:.1f} ms (best of 15), KV allocated {mib:,.0f} MiB"
            for name, (ms, mib) in steps.items()
        ),
        machine.cpu_note(cpu),
    ]
    rows = [
        [f"trial {i + 1}", t["shorts_alone_tok_s"], t["shorts_mixed_tok_s"], t["shorts_ratio"]]
        + [
            f"{a:.2f} / {m:.2f}"
            for a, m in zip(t["longs_alone_tok_s"], t["longs_mixed_tok_s"], strict=True)
        ]
        for i, t in enumerate(trials)
    ]
    publish(
        Report(
            name="engine_mixed",
            title=f"P2 mixed: {args.batch} short streams beside long ones ({args.threads} threads)",
            columns=[
                "trial",
                "shorts alone tok/s",
                "shorts mixed tok/s",
                "mixed / alone",
                *(f"long {n} alone / mixed tok/s" for n in args.long_tokens),
            ],
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": cpu,
                "sizes": {k: v for k, v in vars(args).items() if k not in {"quick", "cache_dir"}},
                "kv_tokens": kv_tokens,
                "trials": trials,
                "decode_step_ms": steps,
                "reachable": reach,
            },
            notes=notes,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
