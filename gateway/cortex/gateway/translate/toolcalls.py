"""Streamed OpenAI tool-call deltas gathered into whole calls; shared by both translators.

Calls are emitted downstream only once complete (at the upstream finish): OpenAI streams may
interleave the deltas of several calls by `index`, while Anthropic needs one content block at a
time and a client's partial-JSON parser must never see arguments that turn out to be invalid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cortex.core.protocol.openai import DeltaToolCall

RAW_ARGUMENTS_KEY = "_raw"


@dataclass
class PendingToolCall:
    """One call being assembled from deltas; id and name come from its first delta."""

    index: int
    id: str | None = None
    name: str = ""
    arguments: str = ""


class ToolCallBuffer:
    """Tool calls of one choice, keyed by their OpenAI delta `index`, in first-seen order."""

    def __init__(self) -> None:
        self._calls: dict[int, PendingToolCall] = {}

    def add(self, delta: DeltaToolCall) -> None:
        call = self._calls.setdefault(delta.index, PendingToolCall(index=delta.index))
        call.id = call.id or delta.id
        if delta.function is not None:
            # Names arrive whole in practice; concatenation also covers servers that split them.
            call.name += delta.function.name or ""
            call.arguments += delta.function.arguments or ""

    def drain(self) -> list[PendingToolCall]:
        """Every call gathered so far, then forget them."""
        calls = list(self._calls.values())
        self._calls.clear()
        return calls


def parse_arguments(raw: str) -> dict[str, Any]:
    """Tool arguments as an object: empty -> {}; invalid JSON or a non-object -> {"_raw": raw}.

    Keeping the raw text (instead of {}) lets the client's tool validation tell the model what
    it actually sent, so it can retry; a small local model produces broken JSON now and then.
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {RAW_ARGUMENTS_KEY: raw}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS_KEY: raw}


def normalize_arguments(raw: str) -> str:
    """Arguments as a JSON object string (OpenAI servers send "{}" for no arguments)."""
    return raw if raw.strip() else "{}"
