"""Terminal views of the fleet (U1): a status table with memory bars, and load progress."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from cortex.core.fleet import ModelState, NeuronStatus

_STATE_STYLE = {
    ModelState.READY: "green",
    ModelState.LOADING: "yellow",
    ModelState.UNLOADING: "magenta",
    ModelState.FAILED: "red",
}


@dataclass(frozen=True)
class NeuronRow:
    name: str
    endpoint: str
    healthy: bool
    status: NeuronStatus | None


def bar(used: int, total: int, width: int = 20) -> str:
    """A text bar like `[#######.............]  35%`."""
    fraction = used / total if total else 0.0
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"


def gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def fleet_table(rows: list[NeuronRow]) -> Table:
    table = Table(title="cortex fleet", expand=False)
    for column in ("neuron", "health", "device", "memory"):
        table.add_column(column)
    table.add_column("models", no_wrap=True)
    for row in rows:
        health = "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]"
        status = row.status
        if status is None or not status.devices:
            table.add_row(row.name, health, "-", "-", "-")
            continue
        for index, device in enumerate(status.devices):
            models = [
                f"[{_STATE_STYLE[m.state]}]{m.id}[/] {m.state.value}"
                + (f" {m.progress:.0%}" if m.state is ModelState.LOADING else "")
                + (f" ({m.in_flight} in flight)" if m.in_flight else "")
                for m in status.models
                if device.id in m.devices
            ]
            memory = f"{bar(device.memory_used, device.memory_total)} {gib(device.memory_used)}/{gib(device.memory_total)}"
            table.add_row(
                row.name if index == 0 else "",
                health if index == 0 else "",
                f"{device.id} {device.name}",
                memory,
                "\n".join(models) or "-",
            )
    return table


def print_fleet(rows: list[NeuronRow], console: Console | None = None) -> None:
    (console or Console()).print(fleet_table(rows))
