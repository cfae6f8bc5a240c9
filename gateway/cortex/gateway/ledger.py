"""Where token budgets are kept: spend settled in a SpendStore (SQLite by default), reservations of
requests in flight in this process. docs/security.md says what is stored where."""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from cortex.core.admin import AdminKey
from cortex.core.errors import BudgetExceeded, SpendUnavailable, TooManyInFlight
from cortex.gateway.auth import Principal
from cortex.gateway.budget import (
    RESERVED_RETRY_AFTER,
    Budget,
    Charge,
    period_end,
    retry_after,
)

IN_MEMORY = ":memory:"
# Where a balance keeps its one row: before every window, so a key given a window later starts it
# with nothing spent (as the ConfigMap store does).
BALANCE_AT = 0.0
COMPACT_EVERY = 60.0  # seconds between removals of spend that left its window


class SpendStore(Protocol):
    """Settled spend per key name: SQLite for one gateway, a shared ConfigMap for the replicas
    on Kubernetes (kube_spend.py). Called on the event loop: they answer without waiting. Both
    keep a window's spend in periods (budget.period_end) and a balance as one total, so what
    they hold, and what an admission reads, does not grow with the number of requests."""

    windows: dict[str, float | None]  # each budgeted key's window (None: a balance)

    def spent(self, key: str, since: float) -> int: ...
    def charges(self, key: str, since: float) -> list[Charge]: ...
    def record(self, key: str, tokens: int, at: float) -> None: ...
    async def reset(self, key: str) -> None: ...


class SqliteSpendStore:
    """Spend in one SQLite file (stdlib sqlite3); it outlives restarts. A key has one row per
    period of its window, or one row for a balance, so queries read a few hundred rows at most
    and run on the event loop, which also keeps reserve-then-record free of races."""

    def __init__(self, path: Path | str) -> None:
        where = str(path)
        if where != IN_MEMORY:
            target = Path(path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            where = str(target)
        self.windows: dict[str, float | None] = {}
        self._compacted = -math.inf  # when rows that left their window were last removed
        self._db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
        try:
            if where != IN_MEMORY:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spend "
                "(key TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS spend_by_key ON spend (key, at)")
        except sqlite3.Error:
            self._db.close()
            raise

    def spent(self, key: str, since: float) -> int:
        row = self._db.execute(
            "SELECT COALESCE(SUM(tokens), 0) FROM spend WHERE key = ? AND at > ?", (key, since)
        ).fetchone()
        return int(row[0])

    def charges(self, key: str, since: float) -> list[Charge]:
        rows = self._db.execute(
            "SELECT at, tokens FROM spend WHERE key = ? AND at > ? ORDER BY at", (key, since)
        )
        return [(float(at), int(tokens)) for at, tokens in rows]

    def record(self, key: str, tokens: int, at: float) -> None:
        """Add the charge to its period's row (a balance's one row, at BALANCE_AT); now and then
        remove what left its window."""
        window = self.windows.get(key)
        kept_at = BALANCE_AT if window is None else period_end(at, window)
        added = self._db.execute(
            "UPDATE spend SET tokens = tokens + ? WHERE key = ? AND at = ?", (tokens, key, kept_at)
        )
        if added.rowcount == 0:
            self._db.execute(
                "INSERT INTO spend (key, at, tokens) VALUES (?, ?, ?)", (key, kept_at, tokens)
            )
        if at >= self._compacted + COMPACT_EVERY:
            self._compact(at)

    def _compact(self, now: float) -> None:
        """Delete the periods that left each key's window, and fold a balance's rows into one
        (rows written one per charge by an older cortex, or periods of a window since removed)."""
        self._compacted = now
        for key, window in self.windows.items():
            if window is not None:
                self._db.execute("DELETE FROM spend WHERE key = ? AND at <= ?", (key, now - window))
                continue
            rows, total = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM spend WHERE key = ?", (key,)
            ).fetchone()
            if rows > 1:  # one transaction: a crash keeps the rows or the total
                self._db.execute("BEGIN")
                try:
                    self._db.execute("DELETE FROM spend WHERE key = ?", (key,))
                    self._db.execute(
                        "INSERT INTO spend (key, at, tokens) VALUES (?, ?, ?)",
                        (key, BALANCE_AT, total),
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    async def reset(self, key: str) -> None:
        self._db.execute("DELETE FROM spend WHERE key = ?", (key,))

    def close(self) -> None:
        self._db.close()


@dataclass(eq=False)
class Reservation:
    """Tokens held for one request, and the function that gives them back: its holder settles it
    once, with the real usage (later calls do nothing); the unused rest returns to the key."""

    key: str
    tokens: int
    give_back: Callable[[int, float], None] = field(repr=False)
    settled: bool = False
    # For a key with a budget: its limit, and what is left of it once this request's worst case
    # is held (told to the client in its answer's headers).
    limit: int | None = None
    remaining: int | None = None

    def settle(self, used: int, now: float) -> None:
        if not self.settled:
            self.settled = True
            self.give_back(used, now)


class Ledger:
    """Admits requests against their key's limits: its budget, by reserving their worst case, and
    its `max_in_flight`, by counting the requests it runs."""

    def __init__(self, store: SpendStore | None) -> None:
        self.store = store
        self._reserved: dict[str, int] = defaultdict(int)
        self._running: dict[str, int] = defaultdict(int)

    def reserve(self, principal: Principal, tokens: int, now: float) -> Reservation | None:
        """A reservation for one request of the caller: `tokens` of its budget and one of its
        `max_in_flight` (None for a key with neither). 429 when the key already runs
        `max_in_flight` requests, or its spend plus open reservations has reached its budget;
        503 for a key with a budget while no spend store is open."""
        key, limit, budget = principal.name, principal.max_in_flight, principal.budget
        if budget is None and limit is None:
            return None
        if limit is not None and self._running[key] >= limit:
            raise TooManyInFlight(
                f"key {key!r} already runs {limit} requests, its max_in_flight: retry when one "
                "ends",
                retry_after=RESERVED_RETRY_AFTER,
            )
        used = None
        if budget is None:
            tokens = 0
        elif self.store is None:  # the gateway opens one before a key with a budget is used
            raise SpendUnavailable(f"key {key!r} has a budget and no spend store is open")
        else:
            used = self._check_budget(self.store, key, budget, now)
        self._reserved[key] += tokens
        self._running[key] += 1
        budgeted = budget is not None
        reservation = Reservation(key, tokens, partial(self._give_back, key, tokens, budgeted))
        if budget is not None and used is not None:
            reservation.limit = budget.limit
            reservation.remaining = max(0, budget.limit - used - self._reserved[key])
        return reservation

    def _check_budget(self, store: SpendStore, key: str, budget: Budget, now: float) -> int:
        """The key's settled spend in its budget's reach; BudgetExceeded when it may not start."""
        since = budget.since(now)
        used = store.spent(key, since)
        # The charges say when a window reopens: read only once it is spent.
        spent_window = budget.window is not None and used >= budget.limit
        charges = store.charges(key, since) if spent_window else []
        wait = retry_after(budget, used, self._reserved[key], charges, now)
        if wait is not None:
            kind = f"per {budget.window:g}s" if budget.window is not None else "in total"
            raise BudgetExceeded(
                f"key {key!r} has used its budget of {budget.limit} tokens {kind}",
                retry_after=wait,
            )
        return used

    def standing(self, principal: Principal, now: float) -> AdminKey:
        """Where the key's limits stand now, for the admin API."""
        key, budget = principal.name, principal.budget
        shown = AdminKey(
            name=key,
            admin=principal.admin,
            models=sorted(principal.models),
            reserved=self.reserved(key),
            running=self.running(key),
            max_in_flight=principal.max_in_flight,
        )
        if budget is not None:
            shown.budget_tokens, shown.budget_window = budget.limit, budget.window
            shown.spent = self.spent(principal, now)
            shown.remaining = max(0, budget.limit - shown.spent - shown.reserved)
        return shown

    async def reset(self, key: str) -> None:
        """Forget the key's settled spend: its budget is whole again. Its requests in flight keep
        their reservations and are charged when they end."""
        if self.store is not None:
            await self.store.reset(key)

    def running(self, key: str) -> int:
        """Requests of this key running now (counted for a key with a limit or a budget)."""
        return self._running.get(key, 0)

    def reserved(self, key: str) -> int:
        return self._reserved.get(key, 0)

    def spent(self, principal: Principal, now: float) -> int:
        """Settled spend that counts against the key's budget now."""
        if principal.budget is None or self.store is None:
            return 0
        return self.store.spent(principal.name, principal.budget.since(now))

    def _give_back(self, key: str, reserved: int, budgeted: bool, used: int, now: float) -> None:
        self._reserved[key] -= reserved
        self._running[key] -= 1
        if budgeted and used > 0 and self.store is not None:
            self.store.record(key, used, now)
