"""cortex benchmarks (docs/benchmarks.md): scripts a user runs, never timed tests.

Run one with `python -m bench <name> [options]` (or `cortex bench <name>`), all with
`python -m bench all`, and list them with `python -m bench --list`.

How a benchmark registers:

1. Write `bench/<module>.py` with `def main(argv: list[str]) -> int` (argparse over `argv`, exit
   status returned). Defaults must finish in minutes on a laptop and need no network.
2. Report through `bench.report`: build a `Report` (name, title, table columns and rows, raw data,
   an optional `draw(figure)` for the plot) and call `publish(report)`, which prints the table and
   writes `docs/benchmarks/<name>.json` and `<name>.png` (or under `$CORTEX_BENCH_OUT`).
3. Add one line to `BENCHMARKS` below: `"<name>": ("bench.<module>", "<what it measures>")`.
   Modules are imported only when run, so one benchmark's heavy imports never slow another.
"""

from __future__ import annotations

BENCHMARKS: dict[str, tuple[str, str]] = {
    "gateway": ("bench.gateway", "P1 gateway overhead: direct vs cortex vs LiteLLM"),
    "engine": ("bench.engine", "P2 engine tokens/s and TTFT vs HF generate()"),
    "prefill": ("bench.prefill", "P2 a long prompt under load: chunked vs whole-prompt prefill"),
    "coldstart": ("bench.coldstart", "P3 time from request to first token, model not loaded"),
    "placement": ("bench.placement", "P4 cold loads of lru/priority vs Belady on a Zipf trace"),
    "operator-scale": (
        "bench.operator_scale",
        "P5 plan() time by fleet size; the operator over 100 neurons x 500 placements",
    ),
    "overload": ("bench.overload", "200 and 500 clients on cortex up: 429s, not an outage"),
    "structured": ("bench.structured", "constrained decoding cost per token, grammar compile"),
    "soak": ("bench.soak", "gateway and neuron memory over 10,000 requests"),
    "gpu-check": ("bench.gpu_check", "a neuron on cuda-dev-0 vs HF generate(), for a lent GPU"),
}
