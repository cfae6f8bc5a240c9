"""Where each decoding sequence's KV sits: a (length band, row) of the runner's band caches.

Rows of a band stay contiguous from row 0, so a band's rows are one slice of its cache: a leaving
sequence's row is refilled by moving the band's last row into it. A sequence whose length
crosses into the next band moves there at a step boundary (once per doubling of its length).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from cortex.neuron.model_runner import ModelRunner


class DecodingRow(Protocol):
    band: int
    row: int  # its staging row until it joins, then its row within the band
    kv_length: int


R = TypeVar("R", bound=DecodingRow)


class DecodeRows(Generic[R]):
    """The decoding sequences by band; iteration is in batch order (band, then row)."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._bands: dict[int, list[R]] = {}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._bands.values())

    def __iter__(self) -> Iterator[R]:
        return iter([item for band in sorted(self._bands) for item in self._bands[band]])

    def join(self, item: R) -> None:
        """A prefilled sequence (item.row: its staging row) joins the band of its length."""
        band = self._runner.band_of(item.kv_length + 1)
        rows = self._bands.setdefault(band, [])
        self._runner.promote(item.row, band, len(rows), item.kv_length)
        item.band, item.row = band, len(rows)
        rows.append(item)

    def leave(self, item: R) -> None:
        """Free the item's row: the band's last row moves into it; an empty band frees its cache."""
        rows = self._bands[item.band]
        last = rows.pop()
        if last is not item:
            self._runner.move((item.band, len(rows)), (item.band, item.row), last.kv_length)
            rows[item.row], last.row = last, item.row
        if not rows:
            del self._bands[item.band]
            self._runner.bands.pop(item.band, None)

    def reband(self) -> None:
        """Move each sequence whose next token takes it past its band into the band it needs."""
        for item in list(self):
            band = self._runner.band_of(item.kv_length + 1)
            if band == item.band:
                continue
            rows = self._bands.setdefault(band, [])
            self._runner.move((item.band, item.row), (band, len(rows)), item.kv_length)
            self.leave(item)
            item.band, item.row = band, len(rows)
            rows.append(item)

    def segments(self, batch: list[R]) -> list[tuple[int, int, list[R]]]:
        """The batch (in batch order) as (band, first row, items) runs of contiguous rows."""
        runs: list[tuple[int, int, list[R]]] = []
        for item in batch:
            if runs and runs[-1][0] == item.band and runs[-1][1] + len(runs[-1][2]) == item.row:
                runs[-1][2].append(item)
            else:
                runs.append((item.band, item.row, [item]))
        return runs

    def shrink(self) -> None:
        """Give back memory each band no longer needs."""
        for band, rows in self._bands.items():
            self._runner.band(band).shrink(len(rows), max(r.kv_length + 1 for r in rows))

    def clear(self) -> None:
        self._bands.clear()
        self._runner.clear()
