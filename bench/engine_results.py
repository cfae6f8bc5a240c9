"""P2 results: what the engine benchmark measured, the targets it judges, its table and plot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.hf_generate import Generated
from bench.loadgen import StreamResult, percentile

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Level:
    """The neuron at one concurrency: every request's timing."""

    concurrency: int
    streams: list[StreamResult]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def per_stream_tokens_per_s(self) -> float:
        rates = [s.completion_tokens / (s.ended - s.started) for s in self.streams]
        return sum(rates) / len(rates)

    def ttft_ms(self, q: float) -> float:
        return percentile([s.ttft * 1000 for s in self.streams], q)


@dataclass
class Trial:
    """One back-to-back comparison: the neuron and generate(), batched and single stream, and
    the neuron's batched streams sampled (temperature 0.8, top_p 0.95) beside its greedy ones."""

    batched_level: Level
    batched: Generated
    single_level: Level
    single: Generated
    sampled_level: Level

    def ratios(self) -> dict[str, float]:
        return {
            "aggregate / generate() single": self.batched_level.tokens_per_s
            / self.single.tokens_per_s,
            "aggregate / generate() batch": self.batched_level.tokens_per_s
            / self.batched.tokens_per_s,
            "single stream / generate() single": self.single_level.tokens_per_s
            / self.single.tokens_per_s,
            "sampled aggregate / greedy aggregate": self.sampled_level.tokens_per_s
            / self.batched_level.tokens_per_s,
        }


def median(values: list[float]) -> float:
    return percentile(values, 50)


TARGETS = {
    "aggregate / generate() single": 8.0,
    "aggregate / generate() batch": 0.9,
    "single stream / generate() single": 1.0,
    "sampled aggregate / greedy aggregate": 0.95,
}


def verdicts(trials: list[Trial], batch: int) -> list[str]:
    """Each target on the median of its per-trial ratios, with every trial's value."""
    lines = []
    for name, target in TARGETS.items():
        values = [t.ratios()[name] for t in trials]
        value = median(values)
        label = name.replace("aggregate", f"aggregate@{batch}").replace("batch", f"batch {batch}")
        lines.append(
            f"target {label} >= {target}x: median {value:.2f}x "
            f"(trials {', '.join(f'{v:.2f}' for v in values)}) -> "
            f"{'met' if value >= target else 'NOT met'}"
        )
    return lines


def draw(levels: list[Level], trials: list[Trial]) -> Callable[[Figure], None]:
    single = median([t.single.tokens_per_s for t in trials])
    batched = median([t.batched.tokens_per_s for t in trials])
    batch = trials[0].batched.batch

    def plot(figure: Figure) -> None:
        rate, ttft = figure.subplots(1, 2)
        xs = [level.concurrency for level in levels]
        rate.plot(xs, [level.tokens_per_s for level in levels], "o-", label="neuron aggregate")
        rate.plot(
            [batch] * len(trials),
            [t.batched_level.tokens_per_s for t in trials],
            "x",
            color="tab:blue",
            label="neuron, paired trials",
        )
        rate.axhline(single, color="tab:red", ls="--", label="generate() single (median)")
        rate.axhline(
            batched, color="tab:purple", ls=":", label=f"generate() batch {batch} (median)"
        )
        rate.set_xscale("log", base=2)
        rate.set_xlabel("concurrent streams")
        rate.set_ylabel("tokens/s")
        rate.legend()
        ttft.plot(xs, [level.ttft_ms(50) for level in levels], "o-", label="p50")
        ttft.plot(xs, [level.ttft_ms(95) for level in levels], "s--", label="p95")
        ttft.set_xscale("log", base=2)
        ttft.set_xlabel("concurrent streams")
        ttft.set_ylabel("TTFT ms")
        ttft.legend()

    return plot


def level_row(label: str, level: Level, single: float) -> list[object]:
    return [
        label,
        level.tokens_per_s,
        level.per_stream_tokens_per_s,
        level.tokens,
        level.ttft_ms(50),
        level.ttft_ms(95),
        level.tokens_per_s / single,
    ]


def generated_row(label: str, g: Generated, single: float) -> list[object]:
    return [
        label,
        g.tokens_per_s,
        g.tokens_per_s / g.batch,
        g.tokens,
        g.ttft_ms or "-",
        "-",
        g.tokens_per_s / single,
    ]


def rows(levels: list[Level], trials: list[Trial]) -> list[list[object]]:
    """The curve against the median generate() single, then each trial against its own."""
    single = median([t.single.tokens_per_s for t in trials])
    table = [level_row(f"neuron, {lv.concurrency} streams", lv, single) for lv in levels]
    for i, t in enumerate(trials, 1):
        own = t.single.tokens_per_s
        table += [
            level_row(
                f"trial {i}: neuron, {t.batched_level.concurrency} streams", t.batched_level, own
            ),
            level_row(
                f"trial {i}: neuron, {t.sampled_level.concurrency} streams sampled",
                t.sampled_level,
                own,
            ),
            generated_row(f"trial {i}: generate() batch {t.batched.batch}", t.batched, own),
            level_row(f"trial {i}: neuron, 1 stream", t.single_level, own),
            generated_row(f"trial {i}: generate() single", t.single, own),
        ]
    return table


def level_data(level: Level) -> dict[str, object]:
    return {
        "concurrency": level.concurrency,
        "tokens": level.tokens,
        "wall_s": level.wall_s,
        "tokens_per_s": level.tokens_per_s,
        "ttft_p50_ms": level.ttft_ms(50),
        "ttft_p95_ms": level.ttft_ms(95),
    }
