"""The engine's decode step on CPU, with its linear kernels and with stock ones (`python -m
bench.decode_step`).

One process, the default model (SmolLM2-135M, float32) through the neuron's loader, the engine's
ModelRunner: a decode step of `--rows` rows (lengths 60, 71, 82 ... tokens, one length band) with
the kernels cpu_linear.py chose for this machine, and with transformers' stock `F.linear`, in
alternating blocks (3 warm-up steps, then `--steps` timed; the order flips every block, so drift
hits both). Reported: each block's median step, the median of the per-block ratios, and whether
both give the same logits. Also the linear layers alone (every layer of the model once, each
kernel form) at the same row counts, which shows what each form does without the rest of the step.
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


def step_blocks(model: nn.Module, rows: int, blocks: int, steps: int) -> dict[str, object]:
    """Median step ms per block for the engine's kernels ("engine") and stock ("stock")."""
    chosen = {m: vars(m)["forward"] for m in model.modules() if "forward" in vars(m)}

    def use(kernels: str) -> None:
        for layer, forward in chosen.items():
            if kernels == "engine":
                layer.forward = forward
            else:
                vars(layer).pop("forward", None)

    runner = ModelRunner(model, device=torch.device("cpu"), max_rows=32, max_length=2048)
    segments = [(0, 0, [0] * rows, [60 + 11 * i for i in range(rows)])]
    medians: dict[str, list[float]] = {"stock": [], "engine": []}
    logits = {}
    for block in range(blocks):
        for kernels in ("stock", "engine") if block % 2 == 0 else ("engine", "stock"):
            use(kernels)
            for _ in range(3):
                logits[kernels] = runner.decode(segments)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                runner.decode(segments)
                times.append(time.perf_counter() - started)
            medians[kernels].append(1000 * statistics.median(times))
    use("engine")
    ratios = [e / s for e, s in zip(medians["engine"], medians["stock"], strict=True)]
    return {
        "block medians ms": medians,
        "engine / stock": statistics.median(ratios),
        "same logits": bool(torch.equal(logits["stock"], logits["engine"])),
        "same tokens": bool(torch.equal(logits["stock"].argmax(-1), logits["engine"].argmax(-1))),
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
        table.append(
            [
                rows,
                f"{statistics.median(medians['stock']):.1f}",
                f"{statistics.median(medians['engine']):.1f}",
                f"{r['engine / stock']:.2f}",
                r["same tokens"],
                " / ".join(f"{alone[k]:.1f}" for k in alone),
            ]
        )
    publish(
        Report(
            name="decode-step",
            title=f"decode step, SmolLM2-135M float32, {args.threads} threads",
            columns=[
                "rows",
                "stock step ms",
                "engine kernels step ms",
                "engine / stock (median of blocks)",
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
