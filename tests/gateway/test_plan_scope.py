"""Which part of a plan an on-demand placement runs and waits for (pure)."""

from __future__ import annotations

from cortex.core.placement.model import Load, Unload
from cortex.gateway.plan_scope import needed_for


def test_a_demand_waits_for_its_evictions_and_moves_only() -> None:
    demanded = Load("big", "n1", 3)
    plan = [
        Unload("stale", "n3", "idle"),  # elsewhere: lifecycle business
        Unload("idle", "n2", "idle"),  # room on n2 that the move below may rely on
        Load("pinned", "n1", 1),  # a pin on the same neuron: not waited for
        Load("x", "n2", 2),  # a defrag move of x off n1 ...
        Unload("x", "n1", "defrag"),  # ... which the demanded load needs
        Unload("after", "n2", "evict"),  # after the move's load on n2: not for it
        Unload("cold", "n1", "evict"),
        demanded,
        Load("later", "n1", 1),  # after the demanded load: not needed
    ]
    assert needed_for(plan, demanded) == [
        Unload("idle", "n2", "idle"),
        Load("x", "n2", 2),
        Unload("x", "n1", "defrag"),
        Unload("cold", "n1", "evict"),
        demanded,
    ]
