"""P2, TTFT under load: a long prompt arriving while streams decode, chunked vs whole prefill.

Each setting runs its own `cortex neuron` (as in `bench engine`: cpu-0, float32, the default
model) with a different `prefill_chunk`: the default 256 tokens per engine step, and one large
enough to read the whole prompt in a single step (what an engine without chunked prefill does).
`--streams` clients start streamed greedy chat completions; once every one of them has its first
token, a long prompt (`--long-tokens`, about) arrives. Reported: the long prompt's TTFT, the
longest gap between two tokens of the running streams while it was read (request sent to its
first token), and their median gap over the whole run for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import machine
from bench.engine import PROMPTS, chat_call, neuron_server
from bench.loadgen import StreamResult, chat_stream, session
from bench.report import Report, publish

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.figure import Figure

WHOLE = 16384  # a chunk larger than any prompt here: the whole prompt in one step
KV_TOKENS = 32768  # room for the long prompt beside the streams (rows pad to the longest)


def long_prompt(tokens: int) -> str:
    """About `tokens` tokens of numbered notes and a question about them."""
    notes = " ".join(
        f"Note {i}: the parcel for house {i * 7 % 100} left on day {i % 30}."
        for i in range(tokens // 18)
    )
    return f"{notes}\nWhich house got the first parcel? Answer in one sentence."


@dataclass
class Interference:
    """One setting: the running streams and the long prompt that arrived among them."""

    prefill_chunk: int
    streams: list[StreamResult]
    long: StreamResult

    @property
    def stall_ms(self) -> float:
        """Longest gap of a running stream while the long prompt was being read."""
        window = (self.long.started, self.long.first_token)
        gaps = [g for s in self.streams for g in s.gaps(*window)]
        return 1000 * max(gaps, default=0.0)

    @property
    def itl_ms(self) -> float:
        """Median gap between tokens of the running streams over the whole run."""
        return 1000 * statistics.median(g for s in self.streams for g in s.gaps())


async def interfere(
    base_url: str, streams: int, max_tokens: int, long_tokens: int
) -> tuple[list[StreamResult], StreamResult]:
    """`streams` decoding, then a long prompt once every stream has produced its first token."""
    all_started = asyncio.Event()
    started = 0

    def one_started() -> None:
        nonlocal started
        started += 1
        if started == streams:
            all_started.set()

    async with session(streams + 1, timeout_s=1800) as http:

        async def long_request() -> StreamResult:
            await all_started.wait()
            return await chat_stream(http, chat_call(base_url, long_prompt(long_tokens), 8))

        running = [
            chat_stream(
                http, chat_call(base_url, PROMPTS[i % len(PROMPTS)], max_tokens), one_started
            )
            for i in range(streams)
        ]
        *results, long = await asyncio.gather(*running, long_request())
    return list(results), long


def measure(args: argparse.Namespace, chunk: int) -> Interference:
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        settings = {"prefill_chunk": chunk, "kv_tokens": KV_TOKENS}
        server = neuron_server(args.threads, args.streams + 1, args.cache_dir, Path(tmp), settings)
        with server:
            asyncio.run(interfere(server.base_url, 1, 4, 64))  # warm-up: first-call costs stay out
            streams, long = asyncio.run(
                interfere(server.base_url, args.streams, args.max_tokens, args.long_tokens)
            )
    result = Interference(chunk, streams, long)
    print(
        f"prefill_chunk {chunk}: long TTFT {result.long.ttft * 1000:.0f} ms, "
        f"running streams' longest gap {result.stall_ms:.0f} ms",
        flush=True,
    )
    return result


def note(chunked: Interference, whole: Interference) -> str:
    shorter = (
        f"{whole.stall_ms / chunked.stall_ms:.1f}x shorter" if chunked.stall_ms else "no gap at all"
    )
    return (
        f"chunked prefill: the running streams' longest gap {chunked.stall_ms:.0f} ms against "
        f"{whole.stall_ms:.0f} ms ({shorter}); the long prompt's TTFT "
        f"{chunked.long.ttft * 1000:.0f} ms against {whole.long.ttft * 1000:.0f} ms"
    )


def draw(results: list[Interference]) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        axes = figure.subplots(1, len(results), sharey=True)
        for ax, r in zip(axes, results, strict=True):
            for s in r.streams:
                times = s.content_times
                ax.plot(
                    [t - r.long.started for t in times[1:]], [1000 * g for g in s.gaps()], ".", ms=2
                )
            ax.axvspan(0, r.long.ttft, color="tab:red", alpha=0.15, label="long prompt being read")
            ax.set_title(f"prefill_chunk {r.prefill_chunk}")
            ax.set_xlabel("seconds since the long prompt was sent")
            ax.legend()
        axes[0].set_ylabel("gap between tokens of a running stream, ms")

    return plot


def parse(argv: list[str]) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench prefill", description=__doc__)
    parser.add_argument("--streams", type=int, default=8, help="streams decoding when it arrives")
    parser.add_argument("--max-tokens", type=int, default=160, help="per running stream")
    parser.add_argument("--long-tokens", type=int, default=2000, help="about this long a prompt")
    parser.add_argument("--chunk", type=int, default=256, help="the chunked setting")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", type=Path, default=None, help="neuron cache_dir")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.max_tokens, args.long_tokens, args.chunk = 2, 24, 200, 64
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    info = machine.describe(threads=args.threads, **machine.versions("cortex", "torch"))
    results = [measure(args, args.chunk), measure(args, WHOLE)]
    rows = [
        [
            f"{r.prefill_chunk} tokens per step"
            if r.prefill_chunk != WHOLE
            else "whole prompt in one step",
            r.long.ttft * 1000,
            r.stall_ms,
            r.itl_ms,
            r.long.completion_tokens,
        ]
        for r in results
    ]
    publish(
        Report(
            name="prefill",
            title=f"P2 a ~{args.long_tokens}-token prompt arriving among {args.streams} running streams",
            columns=[
                "prefill",
                "long prompt TTFT ms",
                "streams' longest gap ms",
                "streams' median gap ms",
                "long tokens",
            ],
            rows=rows,
            data={
                "machine": info,
                "sizes": {k: v for k, v in vars(args).items() if k not in {"quick", "cache_dir"}},
                "results": [
                    {
                        "prefill_chunk": r.prefill_chunk,
                        "long_ttft_ms": r.long.ttft * 1000,
                        "long_prompt_started": r.long.started,
                        "stall_ms": r.stall_ms,
                        "itl_ms": r.itl_ms,
                        "streams_content_times": [list(s.content_times) for s in r.streams],
                    }
                    for r in results
                ],
            },
            notes=[note(*results)],
            draw=draw(results),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
