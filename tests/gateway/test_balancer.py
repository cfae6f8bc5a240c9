"""Replica choice (pure): least in-flight, ties in turn, prefix affinity within a slack."""

from __future__ import annotations

import pytest

from cortex.core.protocol.openai import ChatMessage
from cortex.gateway.dialects.affinity import conversation_key, prompt_key
from cortex.gateway.proxy.balancer import Candidate, pick


def load(**in_flight: int) -> list[Candidate]:
    return [Candidate(name, count) for name, count in in_flight.items()]


def test_least_in_flight_wins_without_affinity() -> None:
    assert pick(load(a=3, b=1, c=2), affinity=None, slack=5) == "b"


def test_ties_are_taken_in_turn() -> None:
    chosen = [pick(load(a=0, b=0, c=1), affinity=None, slack=0, turn=t) for t in range(4)]
    assert chosen == ["a", "b", "a", "b"]


def test_affinity_prefers_one_replica_per_key_regardless_of_order() -> None:
    key = conversation_key([ChatMessage(role="user", content="hello")])
    forward = pick(load(a=0, b=0, c=0), affinity=key, slack=0)
    backward = pick(list(reversed(load(a=0, b=0, c=0))), affinity=key, slack=0)
    assert forward == backward
    keys = [prompt_key(f"prompt {i}") for i in range(60)]
    homes = {pick(load(a=0, b=0, c=0), affinity=k, slack=0) for k in keys}
    assert homes == {"a", "b", "c"}  # keys spread over the replicas


@pytest.mark.parametrize("extra", [0, 1, 2, 3])
def test_affinity_holds_within_the_slack_only(extra: int) -> None:
    key = prompt_key("a long shared system prompt")
    home = pick(load(a=0, b=0), affinity=key, slack=2)
    other = "b" if home == "a" else "a"
    chosen = pick([Candidate(home, extra), Candidate(other, 0)], affinity=key, slack=2)
    assert chosen == (home if extra <= 2 else other)


def test_removing_a_replica_moves_only_its_keys() -> None:
    keys = [prompt_key(f"conversation {i}") for i in range(100)]
    before = {k: pick(load(a=0, b=0, c=0), affinity=k, slack=0) for k in keys}
    after = {k: pick(load(a=0, b=0), affinity=k, slack=0) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "c")


def test_conversation_key_is_stable_across_turns() -> None:
    system = ChatMessage(role="system", content="You are terse.")
    first = [system, ChatMessage(role="user", content="q1")]
    later = [
        *first,
        ChatMessage(role="assistant", content="a1"),
        ChatMessage(role="user", content="q2"),
    ]
    other = [system, ChatMessage(role="user", content="something else")]
    assert conversation_key(first) == conversation_key(later)
    assert conversation_key(first) != conversation_key(other)


def test_no_candidates_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        pick([], affinity=None, slack=0)
