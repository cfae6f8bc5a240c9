"""KV admission on its own: sequences hold what they really use, growing as they decode."""

from __future__ import annotations

from cortex.neuron.kv_bands import BAND_BASE, band_limit, band_of
from cortex.neuron.kv_budget import KV_BLOCK, admits, blocks, held, padded, preemptions


def test_a_sequence_reserves_whole_blocks_of_what_it_holds() -> None:
    assert blocks(1) == KV_BLOCK
    assert blocks(KV_BLOCK) == KV_BLOCK
    assert blocks(KV_BLOCK + 1) == 2 * KV_BLOCK


def test_the_reservation_grows_as_a_sequence_decodes() -> None:
    prompt = 100
    reserved = [held([prompt + generated]) for generated in range(1, 200)]
    assert reserved == sorted(reserved)
    assert reserved[-1] - reserved[0] >= 199 - KV_BLOCK  # it follows the tokens, block by block
    assert reserved[0] == blocks(101)  # not prompt + max_tokens: nothing is held ahead


def test_short_sequences_beside_a_long_one_pay_no_padding() -> None:
    holding = [6000, 2000, *[150] * 16]
    assert held(holding) == blocks(6000) + blocks(2000) + 16 * blocks(150)
    assert held(holding) < padded(holding) / 10  # the old rule: every row as long as 6,000


def test_admission_leaves_each_running_sequence_a_block_to_grow() -> None:
    holding = [100, 300]
    need = held(holding) + blocks(50) + 2 * KV_BLOCK
    assert admits(holding, 50, need)
    assert not admits(holding, 50, need - 1)
    assert admits(holding, 50, None)


def test_a_lone_sequence_is_always_admitted() -> None:
    assert admits([], 10_000, 64)


def test_the_newest_are_preempted_until_the_rest_fits_and_never_the_oldest() -> None:
    holding = [64, 64, 64, 64]  # oldest first
    assert preemptions(holding, 256) == 0
    assert preemptions(holding, 255) == 1
    assert preemptions(holding, 128) == 2
    assert preemptions(holding, 1) == 3  # the oldest runs on alone
    assert preemptions(holding, None) == 0


def test_bands_double_from_the_base() -> None:
    assert band_of(0) == band_of(BAND_BASE - 1) == 0
    assert band_of(BAND_BASE) == 1
    for band in range(1, 8):
        assert band_of(band_limit(band) - 1) == band
        assert band_of(band_limit(band)) == band + 1
        assert band_limit(band) == 2 * band_limit(band - 1)  # rows of a band differ by <= 2x
