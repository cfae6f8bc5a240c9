"""KV admission by the tokens sequences really hold, in blocks, growing as they decode.

A sequence holds its prompt plus what it generated so far, rounded up to whole KV_BLOCKs; not its
max_tokens (a client asking for 32,000 would hold a whole context it may never use) and not the
padding of a batch. A new sequence is admitted when its prompt fits beside what the running ones
hold, with a block of room left for each to grow. When growth overruns the budget anyway, the
newest sequences are preempted (their KV dropped, to be recomputed) until the rest fits; the
oldest always runs, so work always progresses. Pure: token counts in, decisions out.
"""

from __future__ import annotations

from collections.abc import Sequence

KV_BLOCK = 32


def blocks(tokens: int) -> int:
    """Tokens rounded up to whole blocks: what a sequence of that length reserves."""
    return -(-tokens // KV_BLOCK) * KV_BLOCK


def held(holding: Sequence[int]) -> int:
    """What sequences of these lengths reserve together."""
    return sum(blocks(tokens) for tokens in holding)


def admits(holding: Sequence[int], tokens: int, budget: int | None) -> bool:
    """Whether a sequence needing `tokens` joins running ones of lengths `holding`.

    Each running sequence keeps a block of room to grow; a lone sequence always runs (its
    context bounds it).
    """
    if budget is None or not holding:
        return True
    return held(holding) + blocks(tokens) + KV_BLOCK * len(holding) <= budget


def preemptions(holding: Sequence[int], budget: int | None) -> int:
    """How many of the newest sequences (holding: oldest first) must leave for the rest to fit;
    never the oldest."""
    if budget is None:
        return 0
    total, leaving = held(holding), 0
    while total > budget and leaving < len(holding) - 1:
        leaving += 1
        total -= blocks(holding[-leaving])
    return leaving


def padded(holding: Sequence[int]) -> int:
    """What the same sequences held when every row was padded to the longest (the old rule)."""
    return len(holding) * max(holding, default=0)
