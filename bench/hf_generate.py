"""The P2 reference: Hugging Face `generate()` on the neuron's own weights, in this process.

Same converted files, class and dtype as the neuron (loaded through its loader), prompts rendered
through the same chat template, greedy, the same max tokens and torch threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex.core.catalogue import DEFAULT_CATALOGUE, DEFAULT_CHAT_MODEL


@dataclass
class Generated:
    """One generate() call over `batch` prompts at once."""

    batch: int
    tokens: int
    wall_s: float
    ttft_ms: float | None = None  # single stream only (a streamer sees batch 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def load_reference(cache_dir: Path | None, stock: bool = False) -> Any:
    """The default model through the neuron's own loader: same files, same dtype, same class.

    With `stock`, its linear layers keep transformers' own kernel (the loader gives a CPU model
    the engine's choice, cpu_linear.py): what `generate()` runs for a user of transformers.
    """
    from cortex.core.config import NeuronSection
    from cortex.neuron import cpu_linear, loader, sources
    from cortex.neuron.devices import discover

    spec = next(s for s in DEFAULT_CATALOGUE if s.id == DEFAULT_CHAT_MODEL)
    cache = cache_dir or NeuronSection().cache_dir
    devices = discover(only=["cpu-0"])
    weights = loader.load_weights(
        sources.resolve(spec.source), "chat", devices, "float32", cache, lambda _: None
    )
    if stock:
        cpu_linear.uninstall(weights.model)
    return weights


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


def one_stream(runs: list[Generated]) -> Generated:
    """Single-stream runs one after another as one: summed tokens and time, median TTFT."""
    from bench.loadgen import percentile

    return Generated(
        1,
        sum(g.tokens for g in runs),
        sum(g.wall_s for g in runs),
        percentile([g.ttft_ms for g in runs if g.ttft_ms is not None], 50),
    )
