"""`cortex models`, `cortex status` and `cortex keys` against a gateway's admin API
(docs/fleet-control.md): every catalogue model, loaded or not, with where it is and when its idle
TTL unloads it; every API key, with what it spent."""

from __future__ import annotations

import argparse
import asyncio
import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cortex.cli.console import bar, gib
from cortex.core.admin import AdminKeys, AdminModel, AdminModels, GatewayAdmin, load_failure
from cortex.core.errors import CortexError
from cortex.core.fleet import FleetView, ModelState, shown_state

WIDTH = 80  # the status view fits a terminal this wide
_STYLE = {"ready": "green", "loading": "yellow", "unloading": "magenta", "failed": "red"}
# The words are the fleet page's (core/fleet.py shown_state): one vocabulary for both.


def until(model: AdminModel, expires_at: float | None, pinned: bool, now: float) -> str:
    """ollama ps's UNTIL: when the idle TTL unloads a replica (or, unloaded, the TTL itself)."""
    if pinned:
        return "pinned"
    if expires_at is not None:
        return f"in {duration(max(expires_at - now, 0))}"
    if model.idle_ttl is not None:
        return f"ttl {duration(model.idle_ttl)}"
    return "forever"


def duration(seconds: float) -> str:
    seconds = int(seconds)  # never more time than is left
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def models_table(listing: AdminModels, now: float) -> Table:
    """One row per replica, and one per model loaded nowhere."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("MODEL", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("STATE", no_wrap=True)
    table.add_column("NEURON", no_wrap=True, overflow="ellipsis", max_width=14)
    table.add_column("MEMORY", no_wrap=True, justify="right")
    table.add_column("UNTIL", no_wrap=True)
    for model in listing.models:
        for replica in model.replicas:
            state = shown_state(replica.state)
            text = f"[{_STYLE.get(state, 'white')}]{state}[/]"
            if replica.state is ModelState.LOADING:
                text += f" {replica.progress:.0%}"
            table.add_row(
                model.id,
                text,
                replica.neuron,
                gib(replica.memory_bytes),
                until(model, replica.expires_at, replica.pinned, now),
            )
        if not model.replicas:
            state = shown_state(model.state, model.last_error)
            table.add_row(
                model.id,
                f"[{_STYLE.get(state, 'white')}]{state}[/]",
                "-",
                "-",
                until(model, None, False, now),
            )
    return table


def neurons_table(fleet: FleetView, listing: AdminModels) -> Table:
    cordoned = {n.name for n in listing.neurons if n.cordoned}
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=f"cortex fleet: {fleet.status}"
    )
    table.add_column("NEURON", no_wrap=True, overflow="ellipsis", max_width=20)
    table.add_column("HEALTH", no_wrap=True)
    table.add_column("DEVICE", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("MEMORY", no_wrap=True)
    for neuron in fleet.neurons:
        health = "[green]ok[/]" if neuron.healthy else "[red]down[/]"
        if neuron.name in cordoned:
            health += " [yellow]cordoned[/]"
        for device in neuron.devices or [None]:  # type: ignore[list-item]
            memory = (
                f"{bar(device.memory_used, device.memory_total)} "
                f"{gib(device.memory_used)}/{gib(device.memory_total)}"
                if device
                else "-"
            )
            table.add_row(
                neuron.name, health, device.id if device else "-", memory.replace("[", "\\[")
            )
    return table


def failures(fleet: FleetView, listing: AdminModels) -> list[Text]:
    """Why each failed replica (or failed catalogue model) failed, one wrapped line each."""
    why = [
        (f"{replica.id} on {neuron.name}", replica.error or "no reason given")
        for neuron in fleet.neurons
        for replica in neuron.replicas
        if replica.state is ModelState.FAILED
    ]
    why += [(m.id, m.last_error) for m in listing.models if not m.replicas and m.last_error]
    return [Text.assemble((f"{what} failed: ", "red"), reason) for what, reason in why]


async def view(admin: GatewayAdmin) -> Group:
    fleet, listing = await asyncio.gather(admin.fleet(), admin.models())
    now = time.time()
    return Group(
        neurons_table(fleet, listing), "", models_table(listing, now), *failures(fleet, listing)
    )


async def status(admin: GatewayAdmin, watch: float | None) -> int:
    """The fleet once, or redrawn every `watch` seconds until interrupted."""
    console = Console(width=min(Console().width, WIDTH))
    if watch is None:
        console.print(await view(admin))
        return 0
    with Live(await view(admin), console=console, auto_refresh=False) as live:
        try:
            while True:
                await asyncio.sleep(watch)  # the refresh interval the user chose
                live.update(await view(admin), refresh=True)
        except (KeyboardInterrupt, asyncio.CancelledError):
            return 0


async def models(admin: GatewayAdmin, args: argparse.Namespace) -> int:
    console = Console(width=min(Console().width, WIDTH))
    neuron = getattr(args, "neuron", None)
    if args.action == "load":
        await load(admin, args.model, neuron, console)
    elif args.action == "unload":
        done = await admin.unload(args.model, neuron, force=args.force)
        console.print(f"unloaded {done.model} from {', '.join(done.neurons)}")
    elif args.action in ("pin", "unpin"):
        call = admin.pin if args.action == "pin" else admin.unpin
        done = await call(args.model, args.neuron)
        where = ", ".join(done.neurons) or "nowhere"
        console.print(f"{done.model} is pinned on {where}")
    else:
        console.print(models_table(await admin.models(), time.time()))
    return 0


async def load(admin: GatewayAdmin, model: str, neuron: str | None, console: Console) -> None:
    """A progress bar that moves with the gateway's streamed progress lines."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    last = None
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"loading {model}", total=1.0)
        async for line in admin.load(model, neuron):
            last = line
            where = f" on {line.neuron}" if line.neuron else ""
            progress.update(task, completed=line.progress, description=f"loading {model}{where}")
    if last is None or last.state != "ready":
        raise load_failure(last) if last else CortexError(f"load of {model}: no answer")
    console.print(f"{last.model} ready on {last.neuron}")


async def neurons(admin: GatewayAdmin, args: argparse.Namespace) -> int:
    done = await admin.cordon(args.neuron, on=args.action == "cordon")
    print(f"{done.action}ed {', '.join(done.neurons)}")
    return 0


def keys_table(listing: AdminKeys) -> Table:
    """One row per key: what it may use, its budget and what is left, its requests running."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    for column in ("KEY", "MODELS", "BUDGET"):
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=24)
    for column in ("SPENT", "LEFT", "RUNNING"):
        table.add_column(column, no_wrap=True, justify="right")
    for key in listing.keys:
        name = f"{key.name} [cyan]admin[/]" if key.admin else key.name
        budget = "-"
        if key.budget_tokens is not None:
            per = f" per {duration(key.budget_window)}" if key.budget_window else " in total"
            budget = f"{key.budget_tokens:,}{per}"
        cap = f"/{key.max_in_flight}" if key.max_in_flight is not None else ""
        table.add_row(
            name,
            ", ".join(key.models) or "all",
            budget,
            f"{key.spent:,}" if key.spent is not None else "-",
            f"{key.remaining:,}" if key.remaining is not None else "-",
            f"{key.running}{cap}",
        )
    return table


async def keys(admin: GatewayAdmin) -> int:
    listing = await admin.keys()
    if not listing.auth:
        print("auth is off: every caller is anonymous, with no key, budget or limit")
        return 0
    Console(width=WIDTH).print(keys_table(listing))
    return 0


async def reset_key(admin: GatewayAdmin, name: str) -> int:
    key = await admin.reset_key(name)
    left = f"{key.remaining:,} tokens left" if key.remaining is not None else "no budget"
    print(f"reset {key.name}: spent {key.spent or 0:,}, {left}")
    return 0
