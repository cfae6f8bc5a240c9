"""Budget spend kept in a ConfigMap, shared by every gateway replica on Kubernetes (docs/security.md,
"Where spend is stored"). It outlives the pods, so a rollout or a rescheduled pod keeps every
key's spend, and N replicas together hold a key to its budget rather than N times it.

The ledger asks on the event loop and cannot wait for the API server, so the store answers from
a copy: the ConfigMap as last read, plus the charges of this replica not yet written. `sync`
writes those and reads the others' every `interval` seconds, with the object's resourceVersion
as a precondition (a replica that wrote in between makes it read and merge again). So what other
replicas spent shows here within about one interval.

One data entry per key: `{"total": tokens, "spend": {"<end of a period>": tokens}}`. A key with a
window keeps its spend in up to budget.WINDOW_PERIODS periods of that window (a charge counts until its
period ends: a Retry-After is at most one period long); a balance keeps the total only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from cortex.core.errors import error_from_code
from cortex.core.kube_api import Conflict, KubeApi, KubeApiError, Resource
from cortex.gateway.budget import Charge, period_end

log = logging.getLogger(__name__)

CONFIGMAPS = Resource("", "v1", "configmaps")
WRITE_ATTEMPTS = 5  # reads and merges in a row before a sync gives up until the next
_PLAIN = re.compile(r"[-._a-zA-Z0-9]{1,200}")  # what a ConfigMap data key may be


class KubeSpendStore:
    """The `SpendStore` of a gateway on Kubernetes: spend per key name in one ConfigMap."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.interval, self.clock = interval, clock
        # Each key's budget window (None: a balance), which decides how its spend is kept.
        self.windows: dict[str, float | None] = {}
        self._stored: dict[str, _Entry] = {}  # the ConfigMap as last read
        self._unwritten: dict[str, list[Charge]] = defaultdict(list)
        self._writing: dict[str, list[Charge]] = {}  # taken by a sync, not yet stored
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._writes = asyncio.Lock()  # a sync and a reset never interleave

    # -- SpendStore (on the event loop, never waiting)

    def spent(self, key: str, since: float) -> int:
        if since == -math.inf:
            return self._stored.get(key, _Entry()).total + sum(t for _, t in self._local(key))
        return sum(tokens for _, tokens in self.charges(key, since))

    def charges(self, key: str, since: float) -> list[Charge]:
        stored = self._stored.get(key, _Entry()).spend.items()
        found = [(end, tokens) for end, tokens in stored if end > since]
        found += [(at, tokens) for at, tokens in self._local(key) if at > since]
        return sorted(found)

    def record(self, key: str, tokens: int, at: float) -> None:
        self._unwritten[key].append((at, tokens))

    async def reset(self, key: str) -> None:
        """Remove the key's entry from the ConfigMap, and this replica's charges not yet written.
        Charges other replicas have not written yet (at most one interval's) still count."""
        async with self._writes:
            try:
                if await self.api.get(CONFIGMAPS, self.namespace, self.name) is not None:
                    patch = {"data": {_data_key(key): None}}  # null removes it (a merge patch)
                    await self.api.merge_patch(CONFIGMAPS, self.namespace, self.name, patch)
            except KubeApiError as exc:
                message = f"budget spend: ConfigMap {self.name} could not be written: {exc}"
                raise error_from_code(None, message, 503) from exc
            self._unwritten.pop(key, None)
            self._stored.pop(key, None)

    def _local(self, key: str) -> list[Charge]:
        return [*self._writing.get(key, []), *self._unwritten.get(key, [])]

    # -- keeping the copy and the ConfigMap in step

    async def open(self) -> None:
        """The first read (spend already recorded counts from the first request), then syncs
        every `interval` in the background."""
        await self._sync_logged("first read of")
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        """Stop syncing after one last sync, which writes what this replica spent since the one
        before. A sync is never cancelled: one cut off after the server took its write would
        leave its charges unwritten here, and write them twice."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        else:
            await self._sync_logged("last write to")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            stopping = self._stopping.is_set()
            await self._sync_logged("last write to" if stopping else "sync with")
            if stopping:
                return

    async def _sync_logged(self, what: str) -> None:
        try:
            await self.sync()
        except KubeApiError as exc:  # the charges wait for the next sync
            log.warning("budget spend: %s ConfigMap %s failed: %s", what, self.name, exc)

    async def sync(self) -> None:
        """Write this replica's new charges into the ConfigMap and read everyone's."""
        async with self._writes:
            await self._sync()

    async def _sync(self) -> None:
        self._writing, self._unwritten = dict(self._unwritten), defaultdict(list)
        try:
            for _ in range(WRITE_ATTEMPTS):
                try:
                    stored = await self._write_once()
                except Conflict:
                    continue  # another replica wrote first: read its spend and merge again
                self._stored = _read(stored)
                self._writing = {}
                return
            raise KubeApiError(409, f"ConfigMap {self.name}: {WRITE_ATTEMPTS} writes in a row lost")
        finally:
            for key, charges in self._writing.items():  # not stored: write them next time
                self._unwritten[key][:0] = charges
            self._writing = {}

    async def _write_once(self) -> dict[str, Any]:
        current = await self.api.get(CONFIGMAPS, self.namespace, self.name)
        if current is None:
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": self.name},
                "data": {},
            }
            current = await self.api.create(CONFIGMAPS, self.namespace, body)
        if not self._writing:
            return current
        entries, now = _read(current), self.clock()
        changed = {}
        for key, charges in self._writing.items():
            entry = entries.get(key, _Entry())
            entry.add(charges, self.windows.get(key), now)
            changed[_data_key(key)] = entry.dump()
        version = current.get("metadata", {}).get("resourceVersion")
        patch = {"metadata": {"resourceVersion": version}, "data": changed}
        return await self.api.merge_patch(CONFIGMAPS, self.namespace, self.name, patch)


class _Entry:
    """One key's stored spend."""

    def __init__(self, total: int = 0, spend: Mapping[float, int] | None = None) -> None:
        self.total = total
        self.spend = dict(spend or {})  # end of a period -> tokens charged in it

    def add(self, charges: list[Charge], window: float | None, now: float) -> None:
        """Charges in; periods that left the window (all of them, for a balance) out."""
        self.total += sum(tokens for _, tokens in charges)
        if window is None:
            self.spend = {}
            return
        for at, tokens in charges:
            end = period_end(at, window)
            self.spend[end] = self.spend.get(end, 0) + tokens
        self.spend = {end: t for end, t in self.spend.items() if end > now - window}

    def dump(self) -> str:
        spend = {str(int(end)): tokens for end, tokens in sorted(self.spend.items())}
        return json.dumps({"total": self.total, "spend": spend}, separators=(",", ":"))


def _read(configmap: Mapping[str, Any]) -> dict[str, _Entry]:
    entries = {}
    for data_key, value in (configmap.get("data") or {}).items():
        try:
            raw = json.loads(value)
            entry = _Entry(
                int(raw["total"]), {float(end): int(t) for end, t in raw["spend"].items()}
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("budget spend: entry %r of the ConfigMap is not spend; ignored", data_key)
            continue
        entries[_key_name(data_key)] = entry
    return entries


def _data_key(key: str) -> str:
    """A key's name as a ConfigMap data key: itself where it may be one, else base64url."""
    if _PLAIN.fullmatch(key) and not key.startswith("b64."):
        return key
    return "b64." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _key_name(data_key: str) -> str:
    if not data_key.startswith("b64."):
        return data_key
    encoded = data_key[4:]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
