"""Re-reading a config file while the process runs (SIGHUP), shared by the gateway and the
neuron: one reload at a time, a refused file changes nothing, and the log says what changed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from cortex.core.config import ConfigError

log = logging.getLogger("cortex.reload")

Config = TypeVar("Config")


def hangup_handler(
    reread: Callable[[], Config], apply: Callable[[Config], Awaitable[list[str]]]
) -> Callable[[], None]:
    """A SIGHUP handler: `reread` the config file, `apply` it (which returns one line per
    change), one reload at a time. A file that does not read or validate changes nothing;
    anything else that fails is logged, never left for the loop to find."""
    lock = asyncio.Lock()
    running: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        async with lock:
            try:
                changes = await apply(reread())
            except (ConfigError, OSError) as exc:
                log.error("reload refused, the config in use stays: %s", exc)
                return
            except Exception as exc:  # a fault of ours, past the checks `apply` makes first
                name = type(exc).__name__
                log.error("reload failed, part of the new config may be in use: %s: %s", name, exc)
                return
        log.info("config reloaded: %s", "; ".join(line for line in changes if line) or "no change")

    def on_hangup() -> None:
        task = asyncio.get_running_loop().create_task(reload())
        running.add(task)
        task.add_done_callback(running.discard)

    return on_hangup


def named_change(what: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """A line such as "models: added a; removed b; changed c"; empty when nothing changed."""
    parts = [
        f"{verb} {', '.join(sorted(names))}"
        for verb, names in (
            ("added", after.keys() - before.keys()),
            ("removed", before.keys() - after.keys()),
            ("changed", {n for n in before.keys() & after.keys() if before[n] != after[n]}),
        )
        if names
    ]
    return f"{what}: {'; '.join(parts)}" if parts else ""


def differing(old: BaseModel, new: BaseModel, among: Iterable[str] | None = None) -> list[str]:
    """The fields (all of them, or those `among`) whose values differ between two sections."""
    names = type(old).model_fields if among is None else among
    return [name for name in names if getattr(old, name) != getattr(new, name)]
