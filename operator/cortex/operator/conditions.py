"""metav1.Condition bookkeeping: a condition's lastTransitionTime moves only when its status does."""

from __future__ import annotations

from collections.abc import Sequence

from cortex.core.resources import Condition, ConditionStatus, rfc3339


def set_condition(
    conditions: Sequence[Condition],
    kind: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: float,
    generation: int | None = None,
) -> list[Condition]:
    """`conditions` with `kind` set; others kept in order, a new kind appended."""
    previous = next((c for c in conditions if c.type == kind), None)
    if previous is None or previous.status != status:
        since = rfc3339(now)
    else:
        since = previous.last_transition_time
    updated = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == kind else c for c in conditions]
