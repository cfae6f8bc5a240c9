"""P5 operator scale: `plan()` time as the fleet grows, and the real operator over 100 neurons and
500 ModelPlacements (docs/benchmarks.md).

1. The pure planner on synthetic snapshots, 10 -> 1,000 neurons and 100 -> 5,000 replicas
   (bench/planner_scale.py): median wall and CPU time of repeated plans, and the growth exponent
   fitted on log-log against n = neurons + replicas + models, next to n·log n's over the same sizes.
2. The real kopf operator in this process against kmock's emulator over HTTP, with fake neurons
   over real HTTP (bench/scale_operator.py): time until every placement is Ready, reconciles/s
   while getting there and at rest, the operator's RSS and everyone's CPU.

Targets (issue 9): plan() under 100 ms at 1,000 neurons x 5,000 replicas, growth no faster than
n·log n; all 500 placements Ready within 60 s on 100 neurons. `--small` runs in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from bench.machine import describe
from bench.planner_scale import (
    SIZES,
    Timing,
    growth_exponent,
    nlogn_exponent,
    per_nlogn,
    synthetic,
    time_plan,
)
from bench.report import Report, publish, table
from bench.scale_operator import OperatorRun, Scale, measure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLAN_TARGET_MS = 100.0
READY_TARGET_S = 60.0
SMALL_SIZES = ((10, 100), (30, 200), (100, 500))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench operator-scale", description=__doc__)
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--neurons", type=int, default=100)
    parser.add_argument("--placements", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=9, help="plans timed per size")
    parser.add_argument("--load-delay", type=float, default=0.5, help="seconds a fake load takes")
    parser.add_argument("--probe-interval", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for Ready")
    parser.add_argument("--steady", type=float, default=15.0, help="seconds watched at rest")
    parser.add_argument("--skip-operator", action="store_true", help="the planner sweep only")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("kopf").setLevel(logging.WARNING)  # kopf logs every handler run at INFO
    load_before = os.getloadavg()
    machine = describe(load_average=[round(v, 2) for v in load_before])
    sizes = SMALL_SIZES if args.small else SIZES
    repeats = 3 if args.small else args.repeats
    timings = [time_plan(synthetic(n, r), repeats) for n, r in sizes]
    scale = (
        Scale(5, 20, timeout=60.0, steady=2.0, poll=0.25, probe_interval=1.0, load_delay=0.1)
        if args.small
        else Scale(
            args.neurons,
            args.placements,
            load_delay=args.load_delay,
            probe_interval=args.probe_interval,
            timeout=args.timeout,
            steady=args.steady,
        )
    )
    operator_run = None if args.skip_operator else asyncio.run(measure(scale))
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    publish(_report(timings, operator_run, machine))
    return 0


def _report(timings: list[Timing], run: OperatorRun | None, machine: dict[str, object]) -> Report:
    columns = ["neurons", "replicas", "models", "n", "loads", "unloads"]
    columns += ["plan() median ms", "CPU ms", "best ms", "µs per n·log n"]
    rows = [
        [
            t.neurons,
            t.replicas,
            t.models,
            t.n,
            t.loads,
            t.unloads,
            t.median_ms,
            t.cpu_median_ms,
            t.best_ms,
            round(per_nlogn(t), 3),
        ]
        for t in timings
    ]
    exponent, reference = growth_exponent(timings), nlogn_exponent(timings)
    largest = timings[-1]
    notes = [
        f"plan() at {largest.neurons} neurons x {largest.replicas} replicas: median"
        f" {largest.median_ms:.1f} ms wall, {largest.cpu_median_ms:.1f} ms CPU (target"
        f" < {PLAN_TARGET_MS:.0f} ms: {'met' if largest.cpu_median_ms < PLAN_TARGET_MS else 'missed'}"
        " on CPU time; wall time on a shared machine includes waiting for a core).",
        f"growth: time ~ n^{exponent:.2f} (wall), n^{growth_exponent(timings, cpu=True):.2f}"
        f" (CPU); n·log n over the same sizes is n^{reference:.2f}.",
    ]
    data: dict[str, object] = {
        "machine": machine,
        "planner": [asdict(t) for t in timings],
        "growth_exponent": round(exponent, 3),
        "growth_exponent_cpu": round(growth_exponent(timings, cpu=True), 3),
        "nlogn_exponent": round(reference, 3),
    }
    if run is not None:
        notes += _operator_notes(run)
        data["operator"] = {
            **asdict(run),
            "ramp_reconciles_per_s": round(run.ramp_rate, 1),
            "steady_reconciles_per_s": round(run.steady_rate, 1),
        }
    title = "P5 operator scale: plan() time by fleet size, operator time to Ready"
    return Report(
        "operator-scale", title, columns, rows, data, notes, lambda f: _draw(f, timings, run)
    )


def _operator_notes(run: OperatorRun) -> list[str]:
    s = run.scale
    ready = f"{run.all_ready_s:.1f} s" if run.all_ready_s is not None else "not reached"
    met = run.all_ready_s is not None and run.all_ready_s <= READY_TARGET_S
    expected = s.placements / s.probe_interval
    rows = [
        ["neurons x placements", f"{s.neurons} x {s.placements}"],
        ["all Ready after (from the first create)", ready],
        [f"target <= {READY_TARGET_S:.0f} s", "met" if met else "missed"],
        ["placements Ready / phases", f"{run.ready} / {run.phases}"],
        ["creating the placements took", f"{run.create_s:.1f} s"],
        [
            "CPU of the operator's process (operator and driver) over the ramp",
            f"{run.ramp_cpu_s:.1f} s in {run.ramp_s:.1f} s"
            f" ({run.ramp_cpu_s / max(run.ramp_s, 1e-9):.0%} of one core)",
        ],
        ["neurons probed after operator start", f"{run.neurons_probed_s:.1f} s"],
        ["reconciles/s while getting Ready", f"{run.ramp_rate:.1f}"],
        [
            f"reconciles/s at rest ({s.steady:.0f} s; timers alone ask {expected:.0f}/s)",
            f"{run.steady_rate:.1f}",
        ],
        [
            "plans computed while getting Ready (plan_fleet: once per change)",
            f"{run.ramp_plans} in {run.ramp_plan_s:.1f} s"
            f" ({run.ramp_plan_s / max(run.ramp_plans, 1) * 1000:.0f} ms each)",
        ],
        [
            "plans computed at rest",
            f"{run.steady_plans}"
            + (f" ({run.steady_plan_ms:.1f} ms each)" if run.steady_plans else ""),
        ],
        ["load calls on the neurons (one per replica: no duplicates)", str(run.loads)],
        ["Kubernetes Events posted, by reason", f"{run.events} {run.event_reasons}"],
        ["first LoadFailed messages", " | ".join(run.failures) or "none"],
        [
            "operator process RSS before / after / peak",
            f"{run.rss_before_mib:.0f} / {run.rss_after_mib:.0f} / {run.rss_peak_mib:.0f} MiB",
        ],
        ["CPU seconds over the run", ", ".join(f"{k} {v}" for k, v in run.cpu_s.items())],
    ]
    return [
        "operator run (fake load "
        f"{s.load_delay} s, probe interval {s.probe_interval} s):\n"
        + table(["measure", "value"], rows)
    ]


def _draw(figure: Figure, timings: list[Timing], run: OperatorRun | None) -> None:
    left, right = figure.subplots(1, 2)
    n = [t.n for t in timings]
    left.loglog(n, [t.median_ms for t in timings], marker="o", label="plan() wall, median")
    left.loglog(n, [t.cpu_median_ms for t in timings], marker="s", label="plan() CPU, median")
    first = timings[0]
    scale = first.cpu_median_ms / (first.n * math.log(first.n))
    left.loglog(n, [scale * x * math.log(x) for x in n], linestyle="--", label="n·log n")
    left.axhline(PLAN_TARGET_MS, color="red", linestyle=":", label="100 ms target")
    left.set(xlabel="n = neurons + replicas + models", ylabel="ms", title="planner")
    left.legend()
    if run is None or not run.curve:
        right.set_axis_off()
        return
    seconds, ready = zip(*run.curve, strict=True)
    right.plot(seconds, ready, marker=".", label="placements Ready")
    right.axhline(run.scale.placements, color="grey", linestyle="--")
    right.axvline(READY_TARGET_S, color="red", linestyle=":", label="60 s target")
    right.set(
        xlabel="seconds since the first create",
        ylabel="Ready",
        title=f"operator: {run.scale.neurons} neurons, {run.scale.placements} placements",
    )
    right.legend()
