"""Which part of a plan an on-demand placement runs and waits for (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from cortex.core.placement.model import Action, Load, Unload


def needed_for(actions: Sequence[Action], load: Load) -> list[Action]:
    """The part of a plan that `load` depends on: the loads elsewhere of replicas a defrag moves
    off its neuron, and the unloads before each of those loads on its neuron (their room). Other
    loads (pins, minimums) are left to the lifecycle, so a waiting request never waits for them."""
    upto = actions[: actions.index(load) + 1]
    moved = {
        a.model
        for a in upto
        if isinstance(a, Unload) and a.neuron == load.neuron and a.reason == "defrag"
    }
    loads = [a for a in upto if isinstance(a, Load) and (a is load or a.model in moved)]
    last = {a.neuron: upto.index(a) for a in loads}  # the last load each neuron must make room for
    return [
        a
        for i, a in enumerate(upto)
        if a in loads or (isinstance(a, Unload) and i < last.get(a.neuron, -1))
    ]


def is_move(action: Action) -> bool:
    """A defrag move's unload: the moved replica serves until it begins."""
    return isinstance(action, Unload) and action.reason == "defrag"


def describe(actions: Sequence[Action]) -> str:
    return ", ".join(
        f"load {a.model} on {a.neuron}"
        if isinstance(a, Load)
        else f"unload {a.model} from {a.neuron} ({a.reason})"
        for a in actions
    )
