"""How many tokens a request may generate: its max_tokens fitted to what the prompt leaves of
the model's context (docs/architecture.md, "Completion limits").

Lenient (the default), a max_tokens larger than what is left is clamped to it, as llama.cpp and
Ollama do: agents such as Claude Code ask for 32,000 whatever the model. Strict, it is a 400, as
vLLM answers. A prompt that alone fills the context is a 400 either way. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cortex.core.errors import ContextLengthExceeded, InvalidRequest

# On a response whose max_tokens was clamped: "<requested>-><granted>", e.g. "32000->7850".
CLAMPED_HEADER = "x-cortex-max-tokens-clamped"
# On a request from the gateway to a neuron: "true" or "false", the gateway's choice (catalogue
# entry or [gateway] setting) for this request; absent, the neuron's own setting decides.
STRICT_HEADER = "x-cortex-strict-max-tokens"
# On a request from the gateway to a neuron: the model's output limit in the gateway's catalogue
# (`max_output_tokens`, the seed's `limit.output`); a larger max_tokens is fitted to it too.
OUTPUT_CAP_HEADER = "x-cortex-max-output-tokens"


@dataclass(frozen=True)
class CompletionPolicy:
    """What the gateway tells a neuron about one request's max_tokens: how strict to be (None:
    the neuron's own setting) and the model's output limit (None: only the context bounds it)."""

    strict: bool | None = None
    cap: int | None = None

    def headers(self) -> dict[str, str]:
        said = {} if self.strict is None else {STRICT_HEADER: "true" if self.strict else "false"}
        return said if self.cap is None else {**said, OUTPUT_CAP_HEADER: str(self.cap)}


@dataclass(frozen=True)
class CompletionLimit:
    """What the request asked for (None: no limit given) and what it is granted."""

    requested: int | None
    granted: int | None

    @property
    def clamped(self) -> bool:
        return self.requested is not None and self.granted != self.requested

    def headers(self) -> dict[str, str]:
        """The response header that reports a clamp; none when nothing was clamped."""
        if not self.clamped:
            return {}
        return {CLAMPED_HEADER: f"{self.requested}->{self.granted}"}


def fit_max_tokens(
    requested: int | None,
    prompt_tokens: int,
    context: int,
    *,
    strict: bool,
    prompt_param: str,
    cap: int | None = None,
) -> CompletionLimit:
    """`requested` within `context - prompt_tokens` and `cap`: clamped, or (strict) refused with
    a 400 that names the numbers. A prompt that leaves no room for one token is always refused."""
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens. However, your prompt "
            f"has {prompt_tokens} tokens, which leaves no room for a completion. Please reduce "
            "the length of the prompt.",
            param=prompt_param,
        )
    room = context - prompt_tokens
    if cap is not None and requested is not None and requested > cap:
        if strict:
            raise InvalidRequest(
                f"max_tokens {requested} is more than this model allows ({cap} output tokens)",
                param="max_tokens",
            )
        room = min(room, cap)
    if requested is None or requested <= room:
        return CompletionLimit(requested, requested)
    if strict:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} in "
            "the completion). Please reduce the length of the prompt or completion.",
            param="max_tokens",
        )
    return CompletionLimit(requested, room)


def parse_cap(value: str | None) -> int | None:
    """OUTPUT_CAP_HEADER's value: a positive count, or None when absent; anything else a 400."""
    if value is None:
        return None
    try:
        cap = int(value)
    except ValueError:
        cap = 0
    if cap < 1:
        raise InvalidRequest(f"{OUTPUT_CAP_HEADER} must be a positive count, not {value!r}")
    return cap


def parse_strict(value: str | None) -> bool | None:
    """STRICT_HEADER's value: True, False, or None when absent; anything else is a 400."""
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise InvalidRequest(f"{STRICT_HEADER} must be true or false, not {value!r}")


# What a context overflow says (above, and prompts.py's size check), read back for the Anthropic
# surface, whose clients look for Anthropic's own wording: Claude Code offers to compact on
# "prompt is too long", and lowers max_tokens from the numbers of "exceed context limit".
_PROMPT_FILLS = re.compile(
    r"context length is (\d+) tokens\. However, your prompt has (\d+) tokens"
)
_ASKED_TOO_MUCH = re.compile(
    r"context length is (\d+) tokens\. However, you requested \d+ tokens \((\d+) in the prompt, "
    r"(\d+) in the completion\)"
)
_TOO_MANY_CHARS = re.compile(r"The prompt has (\d+) characters; .* cannot hold more than (\d+)")


def anthropic_wording(message: str) -> str:
    """A context overflow's message in the words Anthropic's API uses for it."""
    if found := _ASKED_TOO_MUCH.search(message):
        context, prompt, asked = found.groups()
        return (
            f"input length and `max_tokens` exceed context limit: {prompt} + {asked} > "
            f"{context}, decrease input length or `max_tokens` and try again"
        )
    if found := _PROMPT_FILLS.search(message):
        context, prompt = found.groups()
        return f"prompt is too long: {prompt} tokens > {int(context) - 1} maximum"
    if found := _TOO_MANY_CHARS.search(message):
        chars, limit = found.groups()
        return f"prompt is too long: {chars} characters > {limit} maximum"
    return f"prompt is too long: {message}"
