"""Token budgets (pure): admission against spend plus open reservations, the wait until budget is
back, and a request's worst case."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from cortex.core.errors import BudgetExceeded
from cortex.gateway.auth import Principal
from cortex.gateway.budget import (
    BALANCE_RETRY_AFTER,
    RESERVED_RETRY_AFTER,
    TEMPLATE_TOKENS,
    UNBOUNDED_COMPLETION,
    WINDOW_PERIODS,
    Budget,
    Charge,
    completion_reserve,
    prompt_estimate,
    retry_after,
)
from cortex.gateway.ledger import Ledger, SqliteSpendStore


def test_a_balance_admits_while_spend_and_reservations_are_under_it() -> None:
    balance = Budget(limit=100)
    assert retry_after(balance, used=60, reserved=39, charges=[], now=0) is None
    # Reservations of requests in flight hold the rest: back soon, when they settle.
    assert retry_after(balance, used=60, reserved=40, charges=[], now=0) == RESERVED_RETRY_AFTER
    assert retry_after(balance, used=100, reserved=0, charges=[], now=0) == BALANCE_RETRY_AFTER


def test_a_window_reopens_as_old_charges_expire() -> None:
    window = Budget(limit=100, window=60)
    charges = [(0.0, 50), (10.0, 30), (20.0, 40)]  # 120 in the window: over
    # Dropping the charge at t=0 leaves 70 < 100: open again when it leaves the window at t=60.
    assert retry_after(window, 120, 0, charges, now=20) == 40
    # With 25 reserved, dropping 50 leaves 95 < 100 as well; 35 more reserved needs two to go.
    assert retry_after(window, 120, 25, charges, now=20) == 40
    assert retry_after(window, 120, 35, charges, now=20) == 50
    assert window.since(100) == 40 and Budget(5).since(100) < -1e300


def test_the_worst_case_is_the_bodys_bytes_plus_the_completion_limit() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "é" * 200}], "max_tokens": 7}
    # 400 bytes of text (as UTF-8, not escaped), the JSON around them and the template's part.
    assert 400 + TEMPLATE_TOKENS < prompt_estimate(chat) < 500 + TEMPLATE_TOKENS
    assert completion_reserve(chat, embedding=False, context=None) == 7
    responses = {"model": "m", "input": "hi", "max_output_tokens": 9}
    assert completion_reserve(responses, embedding=True, context=None) == 0  # no completion
    assert completion_reserve(responses, embedding=False, context=None) == 9
    unbounded = {"model": "m", "prompt": "hi"}
    assert completion_reserve(unbounded, embedding=False, context=None) == UNBOUNDED_COMPLETION
    assert completion_reserve(unbounded, embedding=False, context=2048) == 2048


def test_the_completion_reserve_counts_every_choice() -> None:
    """OpenAI's `n` asks for that many completions, each up to the limit: all are reserved."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    assert completion_reserve({**chat, "n": 3}, embedding=False, context=None) == 21
    assert completion_reserve({**chat, "n": 1}, embedding=False, context=None) == 7
    unbounded = {"model": "m", "prompt": "hi", "n": 2}
    assert completion_reserve(unbounded, embedding=False, context=2048) == 4096
    assert completion_reserve(unbounded, embedding=False, context=2048, cap=100) == 200
    assert (
        completion_reserve({**unbounded, "max_tokens": 9000}, embedding=False, context=2048) == 4096
    )


def test_an_n_in_a_translated_apis_body_reserves_one_choice() -> None:
    """Anthropic's and the Responses API have no `n`: one given there asks for nothing (they
    answer one choice), so it cannot multiply the reserve (a million of them was refused)."""
    from cortex.gateway.dialects.anthropic import MESSAGES
    from cortex.gateway.dialects.responses import RESPONSES

    messages = {"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}
    responses = {"model": "m", "input": "hi", "max_output_tokens": 7}
    for dialect, body in ((MESSAGES, messages), (RESPONSES, responses)):
        asked = dialect.parse({**body, "n": 1_000_000})
        assert asked.budgeted is not None
        assert completion_reserve(asked.budgeted, embedding=False, context=None) == 7


def test_spend_outlives_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gateway.sqlite3"
    store = SqliteSpendStore(path)
    store.windows = {"carol": 2400.0, "dave": None}  # carol's periods: 2400 / 240 = 10 s
    store.record("carol", 30, at=5)
    store.record("carol", 12, at=70)
    store.record("dave", 5, at=70)
    store.close()
    reopened = SqliteSpendStore(path)
    assert reopened.spent("carol", since=float("-inf")) == 42
    assert reopened.spent("carol", since=10) == 12  # a window starting at 10 excludes t=5's period
    assert reopened.charges("carol", since=0) == [(10.0, 30), (70.0, 12)]  # at their period's end
    assert reopened.spent("dave", since=float("-inf")) == 5
    assert reopened.spent("nobody", since=0) == 0


def _rows(path: Path, key: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM spend WHERE key = ?", (key,)).fetchone()[0])


def test_the_sqlite_store_stays_small_however_many_requests_it_charges(tmp_path: Path) -> None:
    """A day's window keeps about WINDOW_PERIODS rows and drops them as they leave it; a
    balance keeps one row: what an admission reads does not grow with the traffic."""
    path = tmp_path / "gateway.sqlite3"
    store = SqliteSpendStore(path)
    store.windows = {"daily": 86_400.0, "balance": None}
    for i in range(2000):  # one charge every 43 s over a day
        store.record("daily", 3, at=1_000_000 + i * 43.2)
        store.record("balance", 2, at=1_000_000 + i * 43.2)
    # The window's periods, one partly in it at each end, and one that left it within a minute.
    assert _rows(path, "daily") <= WINDOW_PERIODS + 2 and _rows(path, "balance") == 1
    assert store.spent("daily", since=1_000_000 - 1) == 6000
    assert store.spent("balance", since=float("-inf")) == 4000
    later = 1_000_000 + 3 * 86_400.0  # a day after the last charge: all of it left the window
    store.record("daily", 1, at=later)
    assert _rows(path, "daily") == 1 and store.spent("daily", since=later - 86_400) == 1
    assert store.spent("balance", since=float("-inf")) == 4000  # a balance never expires


def test_rows_an_older_cortex_wrote_per_charge_are_folded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    SqliteSpendStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        rows = [("carol", 100.0 + i, 10) for i in range(50)]
        db.executemany("INSERT INTO spend (key, at, tokens) VALUES (?, ?, ?)", rows)
    store = SqliteSpendStore(path)
    store.windows = {"carol": None}
    store.record("carol", 1, at=200)
    assert _rows(path, "carol") == 1 and store.spent("carol", since=float("-inf")) == 501


class WatchedStore(SqliteSpendStore):
    """The SQLite store, counting the reads of a key's charges (each a row per period)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.charge_reads = 0

    def charges(self, key: str, since: float) -> list[Charge]:
        self.charge_reads += 1
        return super().charges(key, since)


def test_admission_reads_a_windows_charges_only_once_it_is_spent() -> None:
    store = WatchedStore()
    store.windows = {"daily": 86_400.0}
    ledger, daily = Ledger(store), Principal("daily", budget=Budget(1000, 86_400.0))
    for at in range(0, 900, 90):
        ledger.reserve(daily, 10, now=at).settle(90, at)  # type: ignore[union-attr]
    assert store.charge_reads == 0  # 900 of 1000 spent: a sum said so
    ledger.reserve(daily, 10, now=901).settle(100, 901)  # type: ignore[union-attr]
    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve(daily, 10, now=902)
    # The first period (ending at t=0) leaves the window first.
    assert store.charge_reads == 1 and refused.value.retry_after == 86_400 - 902


def test_the_reserve_covers_whichever_completion_limit_the_neuron_obeys() -> None:
    """Chat obeys max_completion_tokens over max_tokens, Responses max_output_tokens: a small
    max_tokens beside a large one of those must not reserve the small one."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def reserved_output(body: dict[str, object], context: int | None = None) -> int:
        return completion_reserve(body, embedding=False, context=context)

    for name in ("max_completion_tokens", "max_output_tokens"):
        body = {**base, "max_tokens": 1, name: 50_000}
        assert reserved_output(body) == 50_000
        assert reserved_output({**body, name: 3}) == 3
        assert reserved_output(body, context=8192) == 8192
