"""P2 mixed workloads (`python -m bench engine --mixed`): short streams beside long-context ones.

One neuron (the same as `bench engine`'s), three phases, each once per trial, in turn:
- shorts alone: `--batch` greedy short streams, aggregate tokens/s over their wall time;
- mixed: the long streams (`--long-tokens`, prompts of about that many tokens) first; once both
  decode, the same short streams start beside them. Short tokens/s as above; each long stream's
  decode rate over the shorts' window is 1 / the median gap between its content chunks
  (`--long-max-tokens` makes them outlast the shorts);
- longs alone: the same long streams, their rate from both decoding to the first one's end.
Targets (median of the per-trial ratios): shorts mixed >= 0.95x shorts alone; longs mixed not
slower than alone. The batch size reachable under the neuron's KV budget, before (rows padded
to the longest, prompt + max_tokens reserved) and after (kv_budget.py), is computed from the
prompt lengths the neuron reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

from bench.loadgen import Call, StreamResult, chat_stream, session
from cortex.core.catalogue import DEFAULT_CHAT_MODEL
from cortex.neuron import kv_budget

LONG_TOKENS = (2000, 6000)
WORDS_PER_ITEM_TOKENS = 13  # "Item 12 is a small blue box on shelf 5." is about 13 tokens


def long_prompt(tokens: int) -> str:
    """A prompt of about `tokens` tokens that asks for a long answer."""
    items = " ".join(
        f"Item {i} is a small blue box on shelf {i % 7}."
        for i in range(tokens // WORDS_PER_ITEM_TOKENS)
    )
    return items + " Describe every shelf in a long, detailed story."


def call(base_url: str, prompt: str, max_tokens: int) -> Call:
    body = {
        "model": DEFAULT_CHAT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call.json(base_url + "/v1/chat/completions", body)


@dataclass
class Phase:
    """One phase: the short streams (if any) and the long ones (if any)."""

    shorts: list[StreamResult]
    longs: list[StreamResult]
    window: tuple[float, float]  # the shorts' span, or the longs' decoding span when alone

    @property
    def short_tokens_per_s(self) -> float:
        return sum(s.completion_tokens for s in self.shorts) / (self.window[1] - self.window[0])

    @property
    def long_rates(self) -> list[float]:
        """Each long stream's decode tokens/s inside the window (1 / median chunk gap)."""
        return [1 / statistics.median(s.gaps(*self.window)) for s in self.longs]


async def run_phase(
    base_url: str, prompts: list[str], longs: list[str], max_tokens: int, long_max: int
) -> Phase:
    """Start the long streams, wait until every one decodes, then run the short ones; the
    window is the shorts' span, or with no shorts, until the first long stream ends."""
    async with session(len(prompts) + len(longs), timeout_s=3600) as http:
        decoding = [asyncio.Event() for _ in longs]
        long_tasks = [
            asyncio.create_task(chat_stream(http, call(base_url, p, long_max), event.set))
            for p, event in zip(longs, decoding, strict=True)
        ]
        for event in decoding:
            await event.wait()
        started = time.perf_counter()
        shorts = await asyncio.gather(
            *(chat_stream(http, call(base_url, p, max_tokens)) for p in prompts)
        )
        ended = time.perf_counter()
        long_results = list(await asyncio.gather(*long_tasks))
    if not prompts:
        ended = min(r.ended for r in long_results)
    return Phase(list(shorts), long_results, (started, ended))


def median(values: list[float]) -> float:
    return statistics.median(values)


def reachable(prompt: int, max_tokens: int, budget: int, limit: int = 4096) -> dict[str, int]:
    """How many sequences of this shape run at once under `budget` KV tokens, before and after."""
    before = max(1, budget // (prompt + max_tokens))
    after = 1
    while after < limit and kv_budget.admits([prompt + 1] * after, prompt + 1, budget):
        after += 1
    return {"before": before, "after": after}


def trial(base_url: str, args: argparse.Namespace, prompts: list[str], longs: list[str]) -> dict:
    """Shorts alone, mixed, then longs alone."""
    long_max = args.long_max_tokens
    alone = asyncio.run(run_phase(base_url, prompts, [], args.max_tokens, long_max))
    print(f"shorts alone: {alone.short_tokens_per_s:.1f} tok/s", flush=True)
    mixed = asyncio.run(run_phase(base_url, prompts, longs, args.max_tokens, long_max))
    print(
        f"mixed: shorts {mixed.short_tokens_per_s:.1f} tok/s, longs "
        f"{', '.join(f'{r:.1f}' for r in mixed.long_rates)} tok/s",
        flush=True,
    )
    longs_only = asyncio.run(run_phase(base_url, [], longs, args.max_tokens, long_max))
    print(f"longs alone: {', '.join(f'{r:.1f}' for r in longs_only.long_rates)} tok/s", flush=True)
    return {
        "shorts_alone_tok_s": alone.short_tokens_per_s,
        "shorts_mixed_tok_s": mixed.short_tokens_per_s,
        "longs_alone_tok_s": longs_only.long_rates,
        "longs_mixed_tok_s": mixed.long_rates,
        "shorts_ratio": mixed.short_tokens_per_s / alone.short_tokens_per_s,
        "longs_ratio": [
            m / a for m, a in zip(mixed.long_rates, longs_only.long_rates, strict=True)
        ],
    }


def step_costs(cache_dir: object, threads: int, repeats: int = 15) -> dict[str, list[float]]:
    """Decode-step milliseconds (best of `repeats`, the cases taking turns) and KV MiB, in this
    process on the same weights: 16 short rows alone, beside the long ones (length bands, and
    padded to the longest as before bands), the long rows alone; the same with sdpa's
    `enable_gqa` (before kv_bands.decode_sdpa); and the parts of the mixed step's physical floor:
    18 short rows (2 more rows of linear) and one read of the long rows' KV at memory speed."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from bench.hf_generate import load_reference
    from cortex.neuron import kv_bands
    from cortex.neuron.model_runner import ModelRunner

    torch.set_num_threads(threads)
    model = load_reference(cache_dir).model
    shorts, longs = [150 + 7 * i for i in range(16)], list(LONG_TOKENS)
    packed = kv_bands.decode_sdpa

    def case(lengths: list[int], banded: bool = True, gqa: bool = False) -> tuple:
        runner = ModelRunner(model, device=torch.device("cpu"), max_rows=18, max_length=8192)
        runner.banded = banded
        rows: dict[int, list[int]] = {}
        for length in lengths:
            rows.setdefault(runner.band_of(length + 1), []).append(length)
        segments = [(band, 0, [0] * len(ls), ls) for band, ls in sorted(rows.items())]

        def step() -> None:
            kv_bands.decode_sdpa = sdpa_attention_forward if gqa else packed
            try:
                runner.decode(segments)
            finally:
                kv_bands.decode_sdpa = packed

        return step, runner

    kv = torch.empty(sum(longs) * case([1])[1].kv_bytes_per_token // 4).normal_()
    cases = {
        "16 short rows alone": case(shorts),
        "16 short + 2 long rows, length bands": case(shorts + longs),
        "16 short + 2 long rows, padded to the longest (before bands)": case(
            shorts + longs, banded=False
        ),
        "2 long rows alone": case(longs),
        "16 short rows alone, enable_gqa (before)": case(shorts, gqa=True),
        "16 short + 2 long rows, bands, enable_gqa (before)": case(shorts + longs, gqa=True),
        "2 long rows alone, enable_gqa (before)": case(longs, gqa=True),
        "18 short rows (16 + 2 rows of linear)": case(shorts + shorts[:2]),
        "read the 2 long rows' KV once (memory floor)": (kv.sum, None),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, (step, _) in cases.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    return {
        name: [1000 * min(times[name]), (runner.kv_bytes if runner else kv.numel() * 4) / 2**20]
        for name, (_, runner) in cases.items()
    }


if __name__ == "__main__":
    import sys

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for name, (ms, mib) in step_costs(None, threads).items():
        print(f"{name}: {ms:.1f} ms, {mib:,.0f} MiB", flush=True)
