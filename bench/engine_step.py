"""Where an engine decode step goes, greedy against sampled, in process
(`python -m bench.engine_step`).

The engine on the default model (the neuron's loader: same files, kernels and lean decode step)
decodes the `bench engine` story prompts, `--rows` at once, `--max-tokens` each, greedy
(temperature 0) and sampled as `bench engine`'s sampled rows are (temperature 0.8, top_p 0.95, a
seed per row, the fallback repetition penalty), alternated `--alternations` times. Each decode
step is split into the forward (`ModelRunner.decode`), `sample()` and emitting the tokens
(`Engine._accept`: detokenising, stop matching); the medians over alternations are reported in
ms a step. No HTTP, no event loop: what end-to-end runs add on top is not here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench import machine
from bench.engine import PROMPTS
from bench.hf_generate import load_reference, prompt_ids
from bench.report import Report, publish
from cortex.neuron import engine as engine_module
from cortex.neuron.engine import Engine, Sequence
from cortex.neuron.generation import GenerationEvent, SamplingParams

PARTS = ("forward", "sample", "accept")


class StepClock:
    """Seconds spent in each part of the decode steps since the last reset."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PARTS, 0.0)

    def timed(self, part: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent[part] += time.perf_counter() - started

        return run

    def reset(self) -> None:
        self.spent = dict.fromkeys(PARTS, 0.0)


@contextmanager
def instrumented(engine: Engine, clock: StepClock) -> Iterator[None]:
    """Time this engine's forward, sampling and token emission; the engine module's `sample` is
    put back on the way out."""
    runner = engine._runner
    runner.decode = clock.timed("forward", runner.decode)  # type: ignore[method-assign]
    engine._accept = clock.timed("accept", engine._accept)  # type: ignore[method-assign]
    sample = engine_module.sample
    engine_module.sample = clock.timed("sample", sample)
    try:
        yield
    finally:
        engine_module.sample = sample


def params(sampled: bool, row: int, max_tokens: int) -> SamplingParams:
    if sampled:
        return SamplingParams(temperature=0.8, top_p=0.95, seed=row, max_tokens=max_tokens)
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def decode_run(
    engine: Engine, clock: StepClock, prompts: list[list[int]], sampled: bool, max_tokens: int
) -> dict[str, float]:
    """Prefill every prompt, then time the decode steps until all rows end: ms a step per part."""
    begun: set[int] = set()  # rows whose first token is out: their prompt is prefilled
    for row, prompt in enumerate(prompts):
        emit: Callable[[GenerationEvent], None] = lambda _, row=row: begun.add(row)  # noqa: E731
        engine.add(Sequence(prompt, params(sampled, row, max_tokens), emit))
    while len(begun) < len(prompts):
        engine.step()
    clock.reset()
    steps, started = 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
    wall = time.perf_counter() - started
    per_step = {part: 1000 * spent / steps for part, spent in clock.spent.items()}
    return per_step | {"step": 1000 * wall / steps, "steps": steps}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_step", description=__doc__)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--alternations", type=int, default=4, help="greedy/sampled pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine.describe(args.threads, **machine.versions("torch", "transformers"))
    weights = load_reference(None)
    engine = Engine(
        weights.model,
        weights.tokenizer,
        device=torch.device("cpu"),
        max_running=args.rows,
        defaults=SamplingParams(),
        eos_token_ids=set(),  # every row decodes all its tokens, greedy and sampled alike
        context_length=8192,
    )
    clock = StepClock()
    prompts = [prompt_ids(weights, PROMPTS[row % len(PROMPTS)]) for row in range(args.rows)]
    watch = machine.CpuWatch()
    runs: dict[str, list[dict[str, float]]] = {"greedy": [], "sampled": []}
    with instrumented(engine, clock), torch.inference_mode():
        decode_run(engine, clock, prompts, False, args.max_tokens)  # warm-up
        for alternation in range(args.alternations):
            for mode in ["greedy", "sampled"][:: 1 if alternation % 2 == 0 else -1]:
                sampled = mode == "sampled"
                runs[mode].append(decode_run(engine, clock, prompts, sampled, args.max_tokens))
    shares = watch.shares()
    medians = {
        mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for mode, results in runs.items()
    }
    keys = (*PARTS, "step")
    rows = [[mode, *(f"{m[key]:.2f}" for key in keys)] for mode, m in medians.items()]
    publish(
        Report(
            name="engine-step",
            title=f"engine decode step, {args.rows} rows, greedy vs sampled ({args.threads} threads)",
            columns=["rows' sampling", *(f"{key} ms" for key in keys)],
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": shares,
                "sizes": vars(args),
                "medians": medians,
                "runs": runs,
            },
            notes=[machine.cpu_note({"run": shares})],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
