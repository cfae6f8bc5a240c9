"""The GPU check's streaming client (httpx: the GPU machine has no aiohttp) and its mixed phase.

The mixed phase is `bench engine --mixed`'s scenario (bench/engine_mixed.py, docs/benchmarks.md
"P2, mixed workloads") where the long rows' KV read is cheap: short streams alone; the same beside
long-context streams started first; the long streams alone. Targets: shorts mixed >= 0.95x alone,
longs mixed not slower than alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

SHORTS_TARGET = 0.95  # shorts mixed / alone
LONGS_TARGET = 1.0  # each long stream's rate mixed / alone


@dataclass
class Streamed:
    """One streamed chat: when it was sent, its content chunks' times, its tokens, its end."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    ended: float = 0.0

    @property
    def ttft(self) -> float:
        return (self.chunks[0] if self.chunks else self.ended) - self.sent

    def rate(self, start: float, end: float) -> float:
        """Decode tokens/s inside [start, end]: 1 / the median gap between chunks there."""
        gaps = [b - a for a, b in itertools.pairwise(self.chunks) if a <= end and b >= start]
        if not gaps:  # finished before the window: its whole decode instead
            gaps = [b - a for a, b in itertools.pairwise(self.chunks)] or [self.ended - self.sent]
        return 1 / statistics.median(gaps)


async def stream_chat(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    max_tokens: int,
    on_first: Callable[[], None] | None = None,
) -> Streamed:
    """A streamed greedy chat; `on_first` is called at its first content chunk."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Streamed(sent=time.perf_counter())
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                result.tokens = int(event["usage"]["completion_tokens"])
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                result.chunks.append(time.perf_counter())
                if on_first is not None and len(result.chunks) == 1:
                    on_first()
    result.ended = time.perf_counter()
    return result


async def phase(
    base_url: str, model: str, shorts: list[str], longs: list[str], max_tokens: int, long_max: int
) -> dict[str, Any]:
    """Start the long streams, wait until each decodes, then run the short ones. The window is
    the shorts' span, or with no shorts, from every long decoding to the first one's end."""
    limits = httpx.Limits(max_connections=len(shorts) + len(longs) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        decoding = [asyncio.Event() for _ in longs]
        long_tasks = [
            asyncio.create_task(stream_chat(client, model, text, long_max, event.set))
            for text, event in zip(longs, decoding, strict=True)
        ]
        for event in decoding:
            await event.wait()
        started = time.perf_counter()
        short_results = await asyncio.gather(
            *(stream_chat(client, model, text, max_tokens) for text in shorts)
        )
        ended = time.perf_counter()
        long_results = await asyncio.gather(*long_tasks)
    if not shorts:
        ended = min(r.ended for r in long_results)
    tokens = sum(r.tokens for r in short_results)
    return {
        "short_tokens": tokens,
        "window_s": ended - started,
        "shorts_tok_s": tokens / (ended - started) if shorts else None,
        "longs_tok_s": [r.rate(started, ended) for r in long_results],
        "long_tokens": [r.tokens for r in long_results],
    }


def mixed(
    base_url: str, model: str, shorts: list[str], longs: list[str], max_tokens: int, long_max: int
) -> dict[str, Any]:
    """Shorts alone, mixed, then longs alone; the ratios beside their targets."""
    alone = asyncio.run(phase(base_url, model, shorts, [], max_tokens, long_max))
    beside = asyncio.run(phase(base_url, model, shorts, longs, max_tokens, long_max))
    longs_alone = asyncio.run(phase(base_url, model, [], longs, max_tokens, long_max))
    return {
        "shorts": len(shorts),
        "shorts_alone": alone,
        "mixed": beside,
        "longs_alone": longs_alone,
        "shorts_ratio": beside["shorts_tok_s"] / alone["shorts_tok_s"],
        "longs_ratio": [
            m / a for m, a in zip(beside["longs_tok_s"], longs_alone["longs_tok_s"], strict=True)
        ],
        "targets": {"shorts_ratio": SHORTS_TARGET, "longs_ratio": LONGS_TARGET},
    }
