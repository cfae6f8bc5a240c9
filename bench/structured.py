"""Structured outputs: per-token cost of grammar-constrained decoding, and grammar compile time.

In this process, on the default model (cpu-0, float32), an Engine is driven step by step as the
device worker drives it. At each level (1 and 16 streams) the same prompts run free and then
constrained (a JSON schema via response_format's grammar), alternating `--trials` times; a
level's overhead is the median of its per-trial ratios of decode seconds per token. Greedy
decoding, no stop at EOS for the free runs (`max_tokens` bounds both). Wall times on a shared
machine swing by more than the overhead, so the grammar work (masking and advancing) is also
timed inside the constrained steps and reported per token. Compile time: a typical
tool schema compiled on a cold cache (miss), then again (hit), `--compiles` times each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import machine
from bench.report import Report, publish
from cortex.core.catalogue import DEFAULT_CATALOGUE, DEFAULT_CHAT_MODEL
from cortex.neuron import engine as engine_module
from cortex.neuron import loader, sources
from cortex.neuron.constraints import tool_call_grammar
from cortex.neuron.devices import discover
from cortex.neuron.engine import Engine, Sequence
from cortex.neuron.generation import Finished, SamplingParams
from cortex.neuron.grammar import GrammarCache, GrammarCompiler, GrammarSpec, Matcher

TOOL = {
    "name": "book_flight",
    "description": "Book a flight",
    "parameters": {
        "type": "object",
        "properties": {
            "origin": {"type": "string"},
            "destination": {"type": "string"},
            "date": {"type": "string", "format": "date"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"type": "string", "enum": ["economy", "business", "first"]},
            "bags": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"kind": {"type": "string"}, "kg": {"type": "number"}},
                    "required": ["kind"],
                },
            },
        },
        "required": ["origin", "destination", "date", "passengers"],
    },
}
# Long free strings keep the constrained runs decoding for max_tokens, as the free ones do.
REPORT_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}


def _engine(max_running: int, cache: Path) -> tuple[Engine, Any, int]:
    spec = next(s for s in DEFAULT_CATALOGUE if s.id == DEFAULT_CHAT_MODEL)
    local = sources.resolve(spec.source, download=False)
    device = discover(only=["cpu-0"])[0]
    weights = loader.load_weights(local, "chat", [device], "float32", cache, lambda _: None)
    engine = Engine(
        weights.model,
        weights.tokenizer,
        device=device.torch_device,
        max_running=max_running,
        defaults=SamplingParams(temperature=0.0),
        eos_token_ids=set(),  # free rows run to max_tokens
        context_length=2048,
    )
    return engine, weights.tokenizer, weights.model.get_input_embeddings().num_embeddings


class _GrammarClock:
    """Seconds spent in the engine's grammar work (masking, advancing): the overhead itself,
    measured inside the same steps, which a machine shared with other work cannot blur."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._mask, self._advance = engine_module.apply_bitmask, Matcher.advance
        engine_module.apply_bitmask = self._timed(self._mask)  # type: ignore[assignment]
        Matcher.advance = self._timed(self._advance)  # type: ignore[method-assign]

    def _timed(self, fn: Any) -> Any:
        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """Decode seconds per token after every prompt is prefilled, and tokens decoded."""
    finished: list[Finished] = []
    sequences = [
        Sequence(p, params, lambda e: finished.append(e) if isinstance(e, Finished) else None)
        for p in prompts
    ]
    for seq in sequences:
        engine.add(seq)
    while engine.waiting or any(len(s.output_ids) == 0 for s in sequences):
        engine.step()  # prefill (and each sequence's first token)
    start_tokens = sum(len(s.output_ids) for s in sequences)
    started = time.perf_counter()
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - started
    tokens = sum(len(s.output_ids) for s in sequences) - start_tokens
    assert all(f.reason in ("stop", "length") for f in finished), finished
    return seconds / max(tokens, 1), tokens


def _compile_times(tokenizer: Any, vocab: int, rounds: int) -> dict[str, list[float]]:
    import cortex.neuron.grammar as grammar

    compiler = GrammarCompiler(tokenizer, vocab, "bench")
    spec = tool_call_grammar([{"type": "function", "function": TOOL}], parallel=False)
    miss, hit = [], []
    for _ in range(rounds):
        grammar._CACHE = GrammarCache()  # cold cache: every first compile is a miss
        started = time.perf_counter()
        compiler.compile(spec)
        miss.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.compile(spec)
        hit.append(time.perf_counter() - started)
    return {"miss": miss, "hit": hit}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench structured", description=__doc__)
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/cortex").expanduser())
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.max_tokens, args.trials, args.compiles = "1,2", 4, 1, 1
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    engine, tokenizer, vocab = _engine(max(levels), args.cache_dir)
    compiler = GrammarCompiler(tokenizer, vocab, "bench-run")
    grammar, _ = compiler.compile(GrammarSpec.json_schema(REPORT_SCHEMA))
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, grammar=grammar)
    data: dict[str, Any] = {"machine": machine.describe(args.threads), "levels": {}}
    clock = _GrammarClock()
    rows = []
    for level in levels:
        prompts = [
            tokenizer.encode(f"Report {i}: write a JSON report about topic {i}.")
            for i in range(level)
        ]
        _run(engine, prompts, constrained)  # warm-up: this batch size's first steps
        trials: list[dict[str, Any]] = []
        for _ in range(args.trials):
            free_s, free_n = _run(engine, prompts, free)
            clock.seconds = 0.0
            cons_s, cons_n = _run(engine, prompts, constrained)
            grammar_s = clock.seconds / max(cons_n, 1)
            trial = {"free": free_s, "constrained": cons_s, "grammar": grammar_s}
            trials.append(trial | {"tokens": [free_n, cons_n]})
        overhead = statistics.median(t["constrained"] / t["free"] - 1 for t in trials)
        share = statistics.median(t["grammar"] / t["free"] for t in trials)
        data["levels"][str(level)] = {"trials": trials, "overhead": overhead, "share": share}
        free_ms, cons_ms, grammar_ms = (
            statistics.median(t[k] for t in trials) * 1e3
            for k in ("free", "constrained", "grammar")
        )
        rows.append(
            [
                f"{level} streams",
                f"{free_ms:.2f}",
                f"{cons_ms:.2f}",
                f"{overhead * 100:+.1f}%",
                f"{grammar_ms:.3f} ({share * 100:.1f}%)",
            ]
        )
    times = _compile_times(tokenizer, vocab, args.compiles)
    data["compile"] = times
    miss_ms, hit_ms = (statistics.median(times[k]) * 1e3 for k in ("miss", "hit"))
    rows.append(["tool schema compile", f"miss {miss_ms:.2f}", f"hit {hit_ms:.3f}", "", ""])
    report = Report(
        name="structured",
        title="Constrained decoding: ms per token (decode) and grammar compile ms",
        columns=[
            "run",
            "free ms/token",
            "constrained ms/token",
            "wall overhead",
            "grammar ms/token (of free)",
        ],
        rows=rows,
        data=data,
    )
    publish(report)
    print(json.dumps({"compile_ms": {"miss": miss_ms, "hit": hit_ms}}))
    return 0
