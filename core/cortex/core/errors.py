"""Domain errors, raised anywhere and mapped once per API surface (see protocol/errors.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shortfall:
    """Memory a model needs and what the place it was refused had free, in bytes: carried by a
    refusal for room (`error.memory` on the wire), so a caller plans with the real size."""

    needed: int
    free: int

    def wire(self) -> dict[str, int]:
        return {"needed": self.needed, "free": self.free}

    @classmethod
    def from_wire(cls, value: Any) -> Shortfall | None:
        """The shortfall an error body carried, or None when it carried none (or garbage)."""
        if not isinstance(value, dict):
            return None
        needed, free = value.get("needed"), value.get("free")
        if type(needed) is not int or type(free) is not int:  # bool is an int, and no size
            return None
        return cls(needed, free)


class CortexError(Exception):
    """Base of every error cortex reports to a client; carries its HTTP status and error code."""

    status: int = 500
    code: str = "internal_error"
    kind: str = "server_error"  # OpenAI `error.type`

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        memory: Shortfall | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        # A refusal for room says how much memory was needed and how much was free.
        self.memory = memory


class InvalidRequest(CortexError):
    status, code, kind = 400, "invalid_request", "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(CortexError):
    status, code, kind = 401, "invalid_api_key", "authentication_error"


class Forbidden(CortexError):
    status, code, kind = 403, "model_not_allowed", "permission_error"


class AdminKeyRequired(Forbidden):
    """A key that is not of the admin class, on the admin surface (docs/security.md)."""

    code = "admin_key_required"


class ModelNotFound(CortexError):
    status, code, kind = 404, "model_not_found", "invalid_request_error"


class ModelBusy(CortexError):
    """An unload refused because the model has requests in flight."""

    status, code, kind = 409, "model_busy", "invalid_request_error"


class SourceConflict(CortexError):
    """A load of a model id that is loaded (or loading) from another source."""

    status, code, kind = 409, "source_conflict", "invalid_request_error"


class CapacityExhausted(CortexError):
    """A model does not fit in the memory that could be freed for it."""

    status, code, kind = 409, "capacity_exhausted", "invalid_request_error"


class PayloadTooLarge(CortexError):
    status, code, kind = 413, "request_too_large", "invalid_request_error"


class ModelLoadFailed(CortexError):
    """A load that failed for a reason the caller can act on (bad path, corrupt file)."""

    status, code, kind = 422, "model_load_failed", "invalid_request_error"


class Overloaded(CortexError):
    """Admission refused: too many requests in flight or queued. Always carries retry_after."""

    status, code, kind = 429, "overloaded", "rate_limit_error"


class QueueTimeout(Overloaded):
    """A request waited its neuron's whole queue timeout for a slot: the neuron is busy, not down."""

    code = "queue_timeout"


class BudgetExceeded(CortexError):
    status, code, kind = 429, "budget_exceeded", "rate_limit_error"


class TooManyInFlight(CortexError):
    """The key already has its `max_in_flight` requests running."""

    status, code, kind = 429, "too_many_in_flight", "rate_limit_error"


class GenerationFailed(CortexError):
    """The generation of this request broke on the neuron; it would break on any replica."""

    status, code, kind = 500, "generation_failed", "server_error"


class SpendUnavailable(CortexError):
    """A key has a budget and no spend store is open to hold it to it: refused, never run free."""

    status, code, kind = 503, "budget_unavailable", "server_error"


class NeuronUnavailable(CortexError):
    """No healthy neuron could take the request (down, unreachable, or load wait timed out)."""

    status, code, kind = 503, "neuron_unavailable", "server_error"


class AnswerTimeout(CortexError):
    """A neuron took the request and answered nothing for the whole read timeout: it may still
    be generating, so another replica would take as long (not retried)."""

    status, code, kind = 504, "neuron_timeout", "server_error"


class NeuronUnreachable(NeuronUnavailable):
    """The neuron could not be reached at all (connection refused or cut): suspect it at once.
    Never built from a neuron's answer, so it shares NeuronUnavailable's code."""


class ShuttingDown(CortexError):
    """The neuron or gateway is draining for shutdown: it finishes what runs and takes nothing new."""

    status, code, kind = 503, "shutting_down", "server_error"


class DeviceUnhealthy(CortexError):
    """The device worker owning the model was poisoned by a device error."""

    status, code, kind = 503, "device_unhealthy", "server_error"


class NeuronNotFound(CortexError):
    """A fleet-control call named a neuron the gateway does not know."""

    status, code, kind = 404, "neuron_not_found", "invalid_request_error"


class KeyNotFound(CortexError):
    """An admin call named an API key the gateway does not know."""

    status, code, kind = 404, "key_not_found", "invalid_request_error"


class FleetConflict(CortexError):
    """A fleet-control call the fleet's state forbids (a cordoned neuron, a pinned replica)."""

    status, code, kind = 409, "fleet_conflict", "invalid_request_error"


class NotSupported(CortexError):
    """A call this gateway's mode does not serve."""

    status, code, kind = 501, "not_supported", "invalid_request_error"


class ClientGone(CortexError):
    """The client disconnected before its answer was ready (nginx's 499); nobody reads it."""

    status, code, kind = 499, "client_closed_request", "invalid_request_error"


ERRORS_BY_CODE: dict[str, type[CortexError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextLengthExceeded,
        Unauthorized,
        Forbidden,
        AdminKeyRequired,
        ModelNotFound,
        ModelBusy,
        SourceConflict,
        CapacityExhausted,
        PayloadTooLarge,
        ModelLoadFailed,
        Overloaded,
        QueueTimeout,
        BudgetExceeded,
        GenerationFailed,
        NeuronUnavailable,
        AnswerTimeout,
        ShuttingDown,
        DeviceUnhealthy,
        NeuronNotFound,
        KeyNotFound,
        FleetConflict,
        NotSupported,
    )
}


def error_from_code(
    code: str | None,
    message: str,
    status: int,
    retry_after: float | None = None,
    param: str | None = None,
    memory: Shortfall | None = None,
) -> CortexError:
    """Rebuild a domain error from an upstream OpenAI-shaped error body (used by NeuronClient)."""
    cls = ERRORS_BY_CODE.get(code or "")
    if cls is None:
        err = CortexError(message, param=param, retry_after=retry_after, memory=memory)
        err.status = status
        err.code = code or "upstream_error"
        return err
    return cls(message, param=param, retry_after=retry_after, memory=memory)
