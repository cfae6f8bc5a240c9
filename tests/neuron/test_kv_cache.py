"""BatchKVCache on its own: growth, shrinking and row moves keep every row's tokens."""

from __future__ import annotations

import torch

from cortex.neuron.kv_cache import BatchKVCache


def cache(max_rows: int = 32, max_length: int = 4096) -> BatchKVCache:
    return BatchKVCache(
        devices=[torch.device("cpu")] * 2,
        kv_heads=1,
        head_dim=2,
        max_rows=max_rows,
        max_length=max_length,
        dtype=torch.float32,
    )


def row_kv(value: float, length: int) -> list[torch.Tensor]:
    return [torch.full((2, 1, length, 2), value) for _ in range(2)]


def test_rows_growing_one_by_one_do_not_grow_the_length() -> None:
    kv = cache()
    kv.reserve(1, 40)
    for rows in range(2, 33):
        kv.reserve(rows, 40)
    assert kv.rows == 32
    assert kv.capacity == 64  # one aligned step, not doubled with every row added


def test_length_doubles_up_to_the_maximum_and_rows_stay() -> None:
    kv = cache(max_length=300)
    kv.reserve(3, 10)
    kv.reserve(3, 65)
    assert (kv.rows, kv.capacity) == (3, 128)
    kv.reserve(3, 200)
    assert kv.capacity == 256
    kv.reserve(3, 290)
    assert kv.capacity == 300  # capped at max_length, never beyond
    assert kv.rows == 3


def test_growth_keeps_what_rows_hold() -> None:
    kv = cache()
    kv.reserve(2, 8)
    kv.write_row(0, row_kv(1.0, 8), 8)
    kv.write_row(1, row_kv(2.0, 8), 8)
    kv.reserve(5, 500)
    assert torch.equal(kv.read_row(0, 8)[1], row_kv(1.0, 8)[1])
    assert torch.equal(kv.read_row(1, 8)[0], row_kv(2.0, 8)[0])
    assert kv.allocated_bytes == 2 * (2 * 5 * 1 * kv.capacity * 2 * 4)


def test_shrink_gives_back_memory_and_keeps_live_rows() -> None:
    kv = cache()
    kv.reserve(4, 1000)
    kv.write_row(0, row_kv(3.0, 20), 20)
    kv.shrink(1, 20)
    assert kv.capacity == 64
    assert torch.equal(kv.read_row(0, 20)[0], row_kv(3.0, 20)[0])
    kv.shrink(0, 0)
    assert kv.allocated_bytes == 0


def test_rows_move_and_copy_between_caches() -> None:
    staging, batch = cache(), cache()
    staging.reserve(3, 16)
    staging.write_row(2, row_kv(5.0, 16), 16)
    batch.copy_row_from(staging, 2, 3, 16)
    assert batch.rows >= 4
    batch.move_row(3, 0, 16)  # the last decoding row fills a leaver's place
    assert torch.equal(batch.read_row(0, 16)[0], row_kv(5.0, 16)[0])
