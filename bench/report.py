"""Shared benchmark output: a table on stdout, JSON and a PNG plot under docs/benchmarks/."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


@dataclass
class Report:
    """One benchmark run: its headline table, raw data for JSON, and a figure to draw."""

    name: str  # file stem: docs/benchmarks/<name>.json and <name>.png
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    data: dict[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()  # lines printed under the table and kept in the JSON
    draw: Callable[[Figure], None] | None = None


def out_dir() -> Path:
    """docs/benchmarks/ of this checkout, or $CORTEX_BENCH_OUT."""
    return Path(os.environ.get("CORTEX_BENCH_OUT", OUT_DIR))


def environment() -> dict[str, Any]:
    """Where the numbers came from, stored with them."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def publish(report: Report) -> list[Path]:
    """Print the table and notes, then write <name>.json and (if it draws) <name>.png."""
    print(f"\n## {report.title}\n")
    print(table(report.columns, report.rows))
    for note in report.notes:
        print(f"\n{note}")
    directory = out_dir()
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": report.name,
        "title": report.title,
        "environment": environment(),
        "table": {"columns": list(report.columns), "rows": [list(r) for r in report.rows]},
        "notes": list(report.notes),
        **report.data,
    }
    written = [directory / f"{report.name}.json"]
    written[0].write_text(json.dumps(document, indent=2, default=str) + "\n")
    if report.draw is not None:
        written.append(_plot(report, directory / f"{report.name}.png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return written


def _plot(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    assert report.draw is not None
    report.draw(figure)
    figure.suptitle(report.title)
    figure.savefig(path, dpi=110)
    return path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
