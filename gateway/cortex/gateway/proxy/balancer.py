"""Replica choice: least in-flight among ready replicas, with prefix affinity (the dialects give
each request its key: dialects/affinity.py). Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A ready replica of the requested model, and the requests this gateway has in flight there."""

    neuron: str
    in_flight: int


def _score(key: str, neuron: str) -> int:
    # Rendezvous hashing: each key ranks every neuron the same way wherever it is computed, and a
    # neuron leaving moves only the keys that preferred it.
    return int.from_bytes(hashlib.sha256(f"{key}/{neuron}".encode()).digest()[:8], "big")


def pick(
    candidates: Sequence[Candidate], *, affinity: str | None, slack: int, turn: int = 0
) -> str:
    """The neuron to send to: the affinity's preferred replica unless it is more than `slack`
    requests busier than the least busy one; otherwise least in-flight (ties taken in turn)."""
    if not candidates:
        raise ValueError("no candidate replicas")
    least = min(c.in_flight for c in candidates)
    if affinity is not None:
        preferred = max(candidates, key=lambda c: (_score(affinity, c.neuron), c.neuron))
        if preferred.in_flight <= least + slack:
            return preferred.neuron
    tied = sorted(c.neuron for c in candidates if c.in_flight == least)
    return tied[turn % len(tied)]
