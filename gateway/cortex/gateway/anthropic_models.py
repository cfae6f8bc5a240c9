"""GET /v1/models in Anthropic's shape, for clients that send `anthropic-version` (Claude Code,
the anthropic SDK): pages of ModelInfo with each model's context and output limits. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from cortex.core.catalogue import ModelSpec
from cortex.core.errors import InvalidRequest, ModelNotFound
from cortex.core.protocol.anthropic import ModelInfo, ModelPage
from cortex.gateway.catalogue import FleetModelCard

VERSION_HEADER = "anthropic-version"
DEFAULT_LIMIT = 20  # the API's page size and bounds
MAX_LIMIT = 1000


def wants_anthropic(headers: Mapping[str, str]) -> bool:
    """Anthropic's SDKs and Claude Code send this header on every call; OpenAI's never do."""
    return VERSION_HEADER in headers


def model_info(spec: ModelSpec, card: FleetModelCard) -> ModelInfo:
    """A model as Anthropic lists it: its context is `max_input_tokens`; `max_tokens` is the
    catalogue's output limit, else the whole context (a larger max_tokens is clamped); none for
    an embedding model."""
    context = card.context_length or spec.context
    return ModelInfo(
        id=spec.id,
        display_name=spec.id,
        created_at=datetime.fromtimestamp(card.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        max_input_tokens=context,
        max_tokens=None if spec.kind == "embedding" else spec.max_output_tokens or context,
    )


def model_page(
    models: Sequence[ModelInfo],
    *,
    limit: str | None = None,
    after_id: str | None = None,
    before_id: str | None = None,
) -> ModelPage:
    """One page of `models` as the API pages them: `limit` after `after_id`, or the `limit`
    just before `before_id`."""
    size = _limit(limit)
    ids = [m.id for m in models]
    start, end = 0, len(models)
    if after_id is not None:
        start = _position(ids, after_id, "after_id") + 1
    if before_id is not None:
        end = _position(ids, before_id, "before_id")
    if before_id is not None and after_id is None:
        start = max(start, end - size)
    page = list(models[start:end][:size])
    more = start + len(page) < end if before_id is None else start > 0
    return ModelPage(
        data=page,
        has_more=more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be from 1 to {MAX_LIMIT}, not {value!r}", param="limit")
    return int(value)


def _position(ids: list[str], model: str, param: str) -> int:
    try:
        return ids.index(model)
    except ValueError:
        raise ModelNotFound(f"{param} {model!r} is not a listed model", param=param) from None
