"""HTTP load generation for the benchmarks: sequential latency and concurrent throughput.

aiohttp, not httpx: on this project's 2-core machine an httpx AsyncClient tops out near 700
requests/s against a bare stub while aiohttp reaches several thousand, and the client must not be
the ceiling of a throughput measurement. The direct-to-stub row of P1 shows what the ceiling is.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp


class LoadError(RuntimeError):
    """A request in a measurement failed; the benchmark reports it rather than a bad number."""


@dataclass(frozen=True)
class Call:
    """One kind of request: a POST with a JSON body, streamed or not."""

    url: str
    body: bytes
    headers: dict[str, str]

    @classmethod
    def json(cls, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Call:
        return cls(
            url, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}
        )


@dataclass(frozen=True)
class Timing:
    """One request: seconds to the first body byte and to the last."""

    first_byte: float
    total: float


@dataclass(frozen=True)
class Throughput:
    requests: int
    errors: int
    seconds: float
    client_cpu_seconds: float  # this process's CPU time: what the client itself cost

    @property
    def per_second(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def session(connections: int, timeout_s: float = 120.0) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout)


async def request(http: aiohttp.ClientSession, call: Call) -> Timing:
    """Send one request and read its whole body (every SSE event of a stream)."""
    started = time.perf_counter()
    first: float | None = None
    async with http.post(call.url, data=call.body, headers=call.headers) as response:
        async for _ in response.content.iter_any():
            first = first or time.perf_counter()
        if response.status != 200:
            raise LoadError(f"{call.url} answered {response.status}")
    ended = time.perf_counter()
    return Timing((first or ended) - started, ended - started)


async def latencies(calls: Sequence[Call], count: int, warmup: int) -> list[list[Timing]]:
    """`count` sequential requests per call, taking turns (call 0, 1, ..., 0, 1, ...) so that a
    background hiccup hits every call alike; each call keeps its own kept-alive connection."""
    sessions = [session(1) for _ in calls]
    try:
        for http, call in zip(sessions, calls, strict=True):
            for _ in range(warmup):
                await request(http, call)
        timings: list[list[Timing]] = [[] for _ in calls]
        for _ in range(count):
            for index, (http, call) in enumerate(zip(sessions, calls, strict=True)):
                timings[index].append(await request(http, call))
        return timings
    finally:
        for http in sessions:
            await http.close()


async def throughput(call: Call, total: int, concurrency: int, warmup: int) -> Throughput:
    """`total` requests from `concurrency` workers, each sending its next as soon as one returns."""
    async with session(concurrency) as http:
        await asyncio.gather(*(request(http, call) for _ in range(min(warmup, concurrency))))
        remaining = iter(range(total))
        errors = 0

        async def worker() -> None:
            nonlocal errors
            for _ in remaining:
                try:
                    await request(http, call)
                except (LoadError, aiohttp.ClientError, TimeoutError):
                    errors += 1

        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        return Throughput(total, errors, seconds, time.process_time() - cpu)


async def paced(call: Call, rate: float, count: int, connections: int = 64) -> list[Timing]:
    """`count` requests started at a steady `rate` per second (open loop: a slow answer does not
    delay the next start), each timed from its own start: latency at a given load."""
    async with session(connections) as http:
        started = time.perf_counter()
        tasks = []
        for index in range(count):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(request(http, call)))
        return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class StreamResult:
    """One streamed chat completion, timed on this side (perf_counter seconds)."""

    started: float
    first_token: float  # the first chunk carrying content, not the empty role chunk
    ended: float
    completion_tokens: int  # from the usage chunk (the server's tokenizer), 0 if none came
    content_times: tuple[float, ...] = ()  # arrival of every chunk carrying content

    @property
    def ttft(self) -> float:
        return self.first_token - self.started

    def gaps(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Seconds between consecutive content chunks, for the gaps overlapping [start, end]."""
        return [b - a for a, b in itertools.pairwise(self.content_times) if a <= end and b >= start]


async def chat_stream(
    http: aiohttp.ClientSession, call: Call, on_first: Callable[[], None] | None = None
) -> StreamResult:
    """POST a streaming chat completion and time its content chunks and its end.

    `on_first` is called when the first content arrives (to start something under load).
    """
    started = time.perf_counter()
    first: float | None = None
    times: list[float] = []
    tokens = 0
    async with http.post(call.url, data=call.body, headers=call.headers) as response:
        if response.status != 200:
            raise LoadError(f"{call.url} answered {response.status}: {await response.text()}")
        async for raw in response.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise LoadError(f"{call.url} stream failed: {event['error']}")
            if event.get("usage"):
                tokens = int(event["usage"].get("completion_tokens", 0))
            choices = event.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times.append(time.perf_counter())
                if first is None:
                    first = times[0]
                    if on_first is not None:
                        on_first()
    ended = time.perf_counter()
    return StreamResult(started, first or ended, ended, tokens, tuple(times))
