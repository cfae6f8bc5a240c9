"""The seam between the proxy and the API surfaces it serves (docs/architecture.md, "Request flow
(gateway)").

The proxy drives a `Dialect` as the neuron's worker drives its `Steppable`: the dialect parses a
client's body into a `ClientRequest`, which says which neuron API serves it (a `NeuronCall`), turns
the neuron's answer back into the client's, or opens a `ReplyStream` that turns the neuron's
stream events into the client's; the dialect formats errors in its surface's envelope. Dialects
are pure: the proxy does the I/O, and ends every call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from cortex.core.errors import CortexError, InvalidRequest, NeuronUnavailable
from cortex.core.protocol.errors import invalid_request
from cortex.core.protocol.openai import ChatCompletion, TokenizeRequest, Usage

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")

# The API a request came in through: a label of the gateway's metrics.
Surface = Literal["openai", "anthropic", "responses"]


@dataclass(frozen=True)
class Chat:
    """The neuron's chat API (streamed or not), with this body."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Completion:
    """The neuron's plain completions API (streamed or not)."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Embedding:
    body: dict[str, Any]


@dataclass(frozen=True)
class Tokenize:
    request: TokenizeRequest


# What a neuron is asked; only `NeuronClient` knows where each one is sent.
NeuronCall = Chat | Completion | Embedding | Tokenize
StreamCall = Chat | Completion


class ReplyStream(Protocol):
    """A streamed answer in the client's dialect, made from the neuron's stream events."""

    def keepalive(self) -> bytes:
        """What the client reads while the stream waits (a cold load)."""
        ...

    def feed(self, event: bytes, payload: dict[str, Any] | None) -> list[bytes]:
        """Frames for one upstream SSE event (`payload`: its JSON data, None for a comment)."""
        ...

    def finish(self) -> list[bytes]:
        """The closing frames, after the neuron's [DONE]."""
        ...

    def fail(self, err: CortexError) -> list[bytes]:
        """The dialect's error frames for a stream that cannot go on; nothing follows them."""
        ...

    def usage(self) -> Usage:
        """The stream's usage: the last the neuron reported, else an estimate from what came."""
        ...


class ClientRequest(Protocol):
    """One client request as its dialect parsed it."""

    @property
    def model(self) -> str:
        """The model as the client named it: an id or an alias."""
        ...

    @property
    def affinity(self) -> str | None:
        """The conversation's key, for prefix-cache affinity."""
        ...

    @property
    def stream(self) -> bool: ...

    @property
    def budgeted(self) -> Mapping[str, Any] | None:
        """The body whose worst case is reserved from the key's budget; None reserves nothing."""
        ...

    def neuron_call(self, model: str) -> NeuronCall:
        """What to ask a neuron serving `model` (the resolved id)."""
        ...

    def answer(self, reply: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
        """The client's answer from the neuron's, and the usage to account."""
        ...

    def reply_stream(self) -> ReplyStream:
        """A fresh stream translator; only asked of a request that streams."""
        ...

    def client_error(self, err: CortexError) -> CortexError:
        """`err` as the client's surface names it: a neuron names the fields of the chat request
        it was sent, which a translated surface knows by other names."""
        ...


class Dialect(Protocol):
    """One API surface: OpenAI chat, completions, embeddings, Anthropic messages, Responses."""

    surface: Surface

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        """Validate a client's JSON body (InvalidRequest naming the field when it is wrong)."""
        ...

    def error_body(self, err: CortexError) -> dict[str, Any]:
        """The surface's error envelope."""
        ...

    def error_status(self, err: CortexError) -> int:
        """The HTTP status the surface answers `err` with (Anthropic's overload is its 529)."""
        ...


def validate(data: dict[str, Any], model: type[M]) -> M:
    """Validate into `model`; the problem is reported with its field path as `param`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), data) from None


def translated(translate: Callable[[R], M], req: R) -> M:
    """`req` translated into the chat request a neuron serves. What that request refuses (a
    combination of fields the client's surface lets through) is the client's 400, not a 500."""
    try:
        return translate(req)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or None
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return InvalidRequest(message, param=where)


def chat_completion(reply: dict[str, Any]) -> ChatCompletion:
    """A neuron's whole chat answer, read; one that cannot be read is the neuron's failure."""
    try:
        return ChatCompletion.model_validate(reply)
    except ValidationError as exc:
        raise NeuronUnavailable(f"neuron answered an unreadable chat completion: {exc}") from None
