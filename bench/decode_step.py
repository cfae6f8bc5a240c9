"""The engine's decode step on CPU: stock kernels, its linear kernels, and its lean Llama forward
(`python -m bench.decode_step`).

One process, the default model (SmolLM2-135M, float32) through the neuron's loader, the engine's
ModelRunner: a decode step of `--rows` rows (lengths 60, 71, 82 ... tokens, one length band) with
transformers' stock `F.linear` and HF forward, with the kernels cpu_linear.py chose for this
machine, with those kernels under llama_decode.py's forward, and the same with `left8`'s padding
off (cpu_linear.py: rows padded to a multiple of 8, where the machine chose it), in alternating
blocks (3 warm-up steps, then `--steps` timed; the order flips every block, so drift hits all).
Reported: each block's median step, the medians of the per-block ratios, and whether they give
the same logits. Also the linear layers alone (every layer of the model once, each kernel form)
at the same row counts, which shows what each form does without the rest of the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from bench import machine
from bench.hf_generate import load_reference
from bench.report import Report, publish
from cortex.neuron import cpu_linear
from cortex.neuron.model_runner import ModelRunner

FORMS = {
    "F.linear": lambda x, layer, packed: nn.functional.linear(x, layer.weight),
    "weight_left": lambda x, layer, packed: cpu_linear.weight_left(x, layer.weight),
    "packed": lambda x, layer, packed: cpu_linear.packed_linear(x, packed, layer.weight),
}


# kernels stock / engine's, HF forward; engine's + lean; the same without left8's padding
VARIANTS = ("stock", "engine", "lean", "unpadded")
TILE = cpu_linear.LEFT_TILE  # what the engine pads to; "unpadded" sets 1 for its own blocks


def step_blocks(model: nn.Module, rows: int, blocks: int, steps: int) -> dict[str, object]:
    """Median step ms per block: stock kernels and the HF forward ("stock"), the engine's kernels
    and the HF forward ("engine"), the engine's kernels and llama_decode's forward ("lean"), and
    "lean" with the `left8` form's rows not padded ("unpadded")."""
    chosen = {m: vars(m)["forward"] for m in model.modules() if "forward" in vars(m)}
    runner = ModelRunner(model, device=torch.device("cpu"), max_rows=32, max_length=2048)
    lean = runner.lean

    def use(variant: str) -> None:
        for layer, forward in chosen.items():
            if variant == "stock":
                vars(layer).pop("forward", None)
            else:
                layer.forward = forward
        runner.lean = lean if variant in ("lean", "unpadded") else None
        cpu_linear.LEFT_TILE = 1 if variant == "unpadded" else TILE

    segments = [(0, 0, [0] * rows, [60 + 11 * i for i in range(rows)])]
    variants = VARIANTS if lean is not None else VARIANTS[:2]
    medians: dict[str, list[float]] = {v: [] for v in variants}
    logits = {}
    for block in range(blocks):
        for variant in variants if block % 2 == 0 else variants[::-1]:
            use(variant)
            for _ in range(3):
                logits[variant] = runner.decode(segments)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                runner.decode(segments)
                times.append(time.perf_counter() - started)
            medians[variant].append(1000 * statistics.median(times))
    use(variants[2] if lean is not None else "engine")  # as the runner serves: padding on

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(medians[a], medians[b], strict=True))

    tokens = {v: logits[v].argmax(-1) for v in variants}
    return {
        "block medians ms": medians,
        "engine / stock": ratio("engine", "stock"),
        "lean / engine": ratio("lean", "engine") if lean is not None else None,
        "lean / stock": ratio("lean", "stock") if lean is not None else None,
        "lean / unpadded": ratio("lean", "unpadded") if lean is not None else None,
        "same logits, engine kernels and stock": bool(
            torch.equal(logits["stock"], logits["engine"])
        ),
        "same logits, lean and HF forward": (
            bool(torch.equal(logits["engine"], logits["lean"])) if lean is not None else None
        ),  # None: this model keeps the HF forward, so there is nothing to compare
        "same tokens": all(torch.equal(tokens["stock"], t) for t in tokens.values()),
    }


def linear_alone(model: nn.Module, rows: int, repeats: int = 7) -> dict[str, float]:
    """Milliseconds for every linear layer of the model once, per kernel form (median)."""
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    packs = (
        [cpu_linear.pack(m.weight) for m in layers] if cpu_linear._can_pack(torch.float32) else []
    )
    inputs = {m.weight.shape[1]: torch.randn(rows, m.weight.shape[1]) for m in layers}
    forms = {k: f for k, f in FORMS.items() if packs or k != "packed"}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():
            started = time.perf_counter()
            for i, layer in enumerate(layers):
                form(inputs[layer.weight.shape[1]], layer, packs[i] if packs else None)
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(seen) for name, seen in times.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_step", description=__doc__)
    parser.add_argument("--rows", default="1,16", help="decode rows, comma separated")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per kernel choice")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="decode-step", help="file stem under docs/benchmarks/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine.describe(args.threads, **machine.versions("torch", "transformers"))
    watch = machine.CpuWatch()
    model = load_reference(None).model  # the loader installs the engine's kernels
    chosen = {repr(shape): forms for shape, forms in cpu_linear.install(model).items()}
    results = {}
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            results[rows] = {**step_blocks(model, rows, args.blocks, args.steps)}
            results[rows]["linear layers alone ms"] = linear_alone(model, rows)
            print(rows, results[rows], flush=True)
    shares = watch.shares()
    table = []
    for rows, r in results.items():
        medians = r["block medians ms"]
        alone = r["linear layers alone ms"]
        lean, unpadded = medians.get("lean"), medians.get("unpadded")
        table.append(
            [
                rows,
                f"{statistics.median(medians['stock']):.1f}",
                f"{statistics.median(medians['engine']):.1f}",
                f"{statistics.median(lean):.1f}" if lean else "-",
                f"{statistics.median(unpadded):.1f}" if unpadded else "-",
                f"{r['engine / stock']:.2f}",
                f"{r['lean / engine']:.2f}" if lean else "-",
                f"{r['lean / unpadded']:.2f}" if lean else "-",
                r["same tokens"],
                " / ".join(f"{alone[k]:.1f}" for k in alone),
            ]
        )
    publish(
        Report(
            name=args.name,
            title=f"decode step, SmolLM2-135M float32, {args.threads} threads",
            columns=[
                "rows",
                "stock step ms",
                "engine kernels step ms",
                "engine kernels + lean forward step ms",
                "the same, left8 unpadded, step ms",
                "engine / stock (median of blocks)",
                "lean / engine (median of blocks)",
                "lean / unpadded (median of blocks)",
                "same tokens",
                "linear layers alone ms: " + " / ".join(FORMS),
            ],
            rows=table,
            data={
                "machine": info,
                "cpu_shares": shares,
                "sizes": vars(args),
                "kernel choice": chosen,
                "packed MiB": cpu_linear.packed_bytes(model) / 2**20,
                "results": {str(k): v for k, v in results.items()},
            },
            notes=[machine.cpu_note({"run": shares})],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
