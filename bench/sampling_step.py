"""The sampling step alone, before and after a change (`python -m bench.sampling_step`).

What `cortex.neuron.sampling.sample` costs per decode step on 16 rows of the default model's
real logits (SmolLM2-135M, 49,152 tokens, the `bench engine` story prompts, captured from a
sampled `generate()` in this process) and on 16 rows of random logits of the same shape, for the
sampling a client gets: greedy, the bench's sampled rows (temperature 0.8, top_p 0.95, a seed,
and the fallback repetition penalty they get), the same without the penalty, the same at
temperature 1.0 (flatter rows: top_p keeps thousands of tokens), the default model's catalogue
defaults, the fallback (temperature 0.7, no top-p), OpenAI's presence and frequency penalties,
vLLM's min_p and half greedy, half sampled.
`--before REV` times the same calls on sampling.py as it was at REV, interleaved step by step
with the current one, and counts how many tokens the two chose alike (same seeds). A REV from
before OpenAI's presence and frequency penalties, or min_p, samples that scenario's rows without
them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from inspect import signature

import torch

from bench import machine
from bench.report import Report, publish
from cortex.neuron import sampling
from cortex.neuron.generation import SamplingParams
from cortex.neuron.sampling import Sampler, recent_tokens

ROWS = 16
SOURCE = "neuron-image/cortex/neuron/sampling.py"

SCENARIOS: dict[str, list[SamplingParams]] = {
    "greedy": [SamplingParams(temperature=0)] * ROWS,
    "bench sampled (t 0.8, top_p 0.95, penalty 1.1)": [
        SamplingParams(temperature=0.8, top_p=0.95, seed=row) for row in range(ROWS)
    ],
    "t 0.8, top_p 0.95, no penalty": [
        SamplingParams(temperature=0.8, top_p=0.95, seed=row, repetition_penalty=1.0)
        for row in range(ROWS)
    ],
    "t 1.0, top_p 0.95, penalty 1.1 (flatter: rows keep thousands)": [
        SamplingParams(temperature=1.0, top_p=0.95, seed=row) for row in range(ROWS)
    ],
    "catalogue defaults (t 0.2, top_p 0.9, penalty 1.1)": [
        SamplingParams(temperature=0.2, top_p=0.9, seed=row) for row in range(ROWS)
    ],
    "fallback (t 0.7, no top_p, penalty 1.1)": [SamplingParams(seed=row) for row in range(ROWS)],
    "t 0.8, top_p 0.95, presence 0.5, frequency 0.5 (OpenAI's penalties)": [
        SamplingParams(
            temperature=0.8,
            top_p=0.95,
            seed=row,
            repetition_penalty=1.0,
            presence_penalty=0.5,
            frequency_penalty=0.5,
        )
        for row in range(ROWS)
    ],
    "t 1.0, min_p 0.05, penalty 1.1 (vLLM's min_p)": [
        SamplingParams(temperature=1.0, min_p=0.05, seed=row) for row in range(ROWS)
    ],
    "8 greedy + 8 bench sampled": [
        SamplingParams(temperature=0 if row % 2 else 0.8, top_p=0.95, seed=row)
        for row in range(ROWS)
    ],
}


@dataclass
class Step:
    """One decode step's logits [ROWS, vocab] and each row's tokens so far."""

    logits: torch.Tensor
    prompts: list[list[int]]
    outputs: list[list[int]]


def real_steps(steps: int) -> list[Step]:
    """Logits of a sampled generate() over the bench prompts, in this process."""
    from bench.engine import PROMPTS
    from bench.hf_generate import load_reference, prompt_ids

    weights = load_reference(None)
    prompts = [prompt_ids(weights, PROMPTS[row % len(PROMPTS)]) for row in range(ROWS)]
    longest = max(map(len, prompts))
    pad = weights.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    with torch.inference_mode():
        out = weights.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=steps,
            min_new_tokens=steps,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
    generated = out.sequences[:, longest:].tolist()
    return [
        Step(logits.float().contiguous(), prompts, [row[:at] for row in generated])
        for at, logits in enumerate(out.logits)
    ]


def random_steps(steps: int, vocab: int) -> list[Step]:
    """Random logits of the real shape: a few strong tokens per row over a flat tail."""
    generator = torch.Generator().manual_seed(0)
    prompts = [[row + 1] * 40 for row in range(ROWS)]
    scale = torch.linspace(6, 2, ROWS)[:, None]
    return [
        Step(torch.randn(ROWS, vocab, generator=generator) * scale, prompts, [[]] * ROWS)
        for _ in range(steps)
    ]


def old_sampling(rev: str) -> types.ModuleType:
    """sampling.py as it was at `rev`, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=machine.ROOT, check=True, capture_output=True
    ).stdout.decode()
    module = types.ModuleType(f"sampling_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{SOURCE}", "exec"), module.__dict__)
    return module


def run_scenario(
    sample: Callable[..., list[int]], steps: list[Step], params: list[SamplingParams]
) -> tuple[list[float], list[int]]:
    """Milliseconds per step and the tokens chosen, with fresh generators."""
    samplers = [Sampler.resolve(p, SamplingParams()) for p in params]
    generators = [s.generator(torch.device("cpu")) for s in samplers]
    # A revision from before OpenAI's penalties samples those rows without them.
    counted = any(s.counts_output for s in samplers) and "outputs" in signature(sample).parameters
    times, tokens = [], []
    for step in steps:
        logits = step.logits.clone()
        started = time.perf_counter()
        recent = [
            recent_tokens(prompt, output) if s.repetition_penalty != 1.0 else []
            for s, prompt, output in zip(samplers, step.prompts, step.outputs, strict=True)
        ]
        if counted:  # the rows' output so far, for OpenAI's penalties
            tokens += sample(logits, samplers, generators, recent, outputs=step.outputs)
        else:
            tokens += sample(logits, samplers, generators, recent)
        times.append(1000 * (time.perf_counter() - started))
    return times, tokens


def measure(
    implementations: dict[str, Callable[..., list[int]]], steps: list[Step], repeats: int
) -> dict[str, dict[str, object]]:
    """Per scenario and implementation: mean over steps of each step's best time, and tokens."""
    results: dict[str, dict[str, object]] = {}
    for scenario, params in SCENARIOS.items():
        best: dict[str, list[float]] = {}
        tokens: dict[str, list[int]] = {}
        for repeat in range(repeats):
            order = list(implementations) if repeat % 2 == 0 else list(implementations)[::-1]
            for name in order:
                times, chosen = run_scenario(implementations[name], steps, params)
                best[name] = [min(pair) for pair in zip(best.get(name, times), times, strict=True)]
                tokens[name] = chosen
        results[scenario] = {
            name: {"ms": statistics.fmean(times), "tokens": tokens[name]}
            for name, times in best.items()
        }
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling_step", description=__doc__)
    parser.add_argument("--before", help="also time sampling.py at this git revision")
    parser.add_argument("--steps", type=int, default=24, help="decode steps of logits")
    parser.add_argument("--repeats", type=int, default=5, help="best of, per step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-real", action="store_true", help="random logits only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine.describe(args.threads, **machine.versions("torch"))
    implementations: dict[str, Callable[..., list[int]]] = {"now": sampling.sample}
    if args.before:
        implementations = {f"at {args.before}": old_sampling(args.before).sample, **implementations}
    watch = machine.CpuWatch()
    sets = {"random": random_steps(args.steps, 49152)}
    if not args.no_real:
        sets["SmolLM2 real"] = real_steps(args.steps)
    results = {name: measure(implementations, steps, args.repeats) for name, steps in sets.items()}
    shares = watch.shares()
    rows = []
    for logits, scenarios in results.items():
        for scenario, by_name in scenarios.items():
            times = [by_name[name]["ms"] for name in implementations]
            row: list[object] = [logits, scenario, *(f"{t:.2f}" for t in times)]
            if args.before:
                before, now = (by_name[name]["tokens"] for name in implementations)
                alike = sum(a == b for a, b in zip(before, now, strict=True)) / len(now)
                row.append(f"{alike:.1%}")
            rows.append(row)
    publish(
        Report(
            name="sampling-step",
            title=f"sample() per decode step, {ROWS} rows x 49,152 ({args.threads} threads)",
            columns=[
                "logits",
                "sampling",
                *(f"{name} ms" for name in implementations),
                *(["same tokens"] if args.before else []),
            ],
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": shares,
                "sizes": vars(args),
                "ms": {
                    logits: {s: {n: v["ms"] for n, v in r.items()} for s, r in scenarios.items()}
                    for logits, scenarios in results.items()
                },
            },
            notes=[machine.cpu_note({"run": shares})],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
