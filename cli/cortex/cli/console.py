"""Terminal views of the fleet (U1): a status table with memory bars, and load progress."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cortex.core.fleet import LoadedModel, ModelState, NeuronStatus

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


def bar(used: int, total: int, width: int = 10) -> str:
    """A text bar like `[#######.............]  35%`."""
    fraction = used / total if total else 0.0
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"


def gib(value: int) -> str:
    return f"{value / 2**30:.1f}G"


def _state(model: LoadedModel) -> str:
    text = f"[{_STATE_STYLE[model.state]}]{model.state.value}[/]"
    if model.state is ModelState.LOADING:
        text += f" {model.progress:.0%}"
    if model.in_flight:
        text += f" ({model.in_flight} in flight)"
    if model.queued:
        text += f" ({model.queued} queued)"
    return text


def fleet_table(rows: list[NeuronRow]) -> Table:
    """One line per model (and per device without models): where everything is and how full."""
    table = Table(title="cortex fleet")
    for column in ("neuron", "device", "memory", "model", "state"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        name = f"[green]{row.name}[/]" if row.healthy else f"[red]{row.name} (unhealthy)[/]"
        status = row.status
        if status is None or not status.devices:
            table.add_row(name, "-", "-", "-", "-")
            continue
        for device in status.devices:
            used = f"{escape(bar(device.memory_used, device.memory_total))} {gib(device.memory_used)}/{gib(device.memory_total)}"
            models: list[LoadedModel | None] = [
                m for m in status.models if device.id in m.devices
            ] or [None]
            device_id = device.id
            for model in models:
                table.add_row(
                    name,
                    device_id,
                    used,
                    model.id if model else "-",
                    _state(model) if model else "-",
                )
                name = device_id = used = ""
    return table


def print_fleet(rows: list[NeuronRow], console: Console | None = None) -> None:
    (console or Console()).print(fleet_table(rows))
