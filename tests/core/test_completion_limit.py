"""max_tokens fitted to the context: clamped by default, a 400 when strict, never a prompt that
alone fills the context."""

from __future__ import annotations

import pytest

from cortex.core.completion_limit import (
    CLAMPED_HEADER,
    CompletionLimit,
    anthropic_wording,
    fit_max_tokens,
    parse_strict,
)
from cortex.core.errors import ContextLengthExceeded, InvalidRequest
from cortex.core.protocol.errors import anthropic_error, openai_error
from cortex.neuron.prompts import PromptPool


def test_claude_codes_32000_is_clamped_to_what_the_prompt_leaves() -> None:
    limit = fit_max_tokens(32000, 342, 8192, strict=False, prompt_param="messages")
    assert limit == CompletionLimit(requested=32000, granted=7850)
    assert limit.clamped and limit.headers() == {CLAMPED_HEADER: "32000->7850"}


@pytest.mark.parametrize("requested", [None, 1, 7850])
def test_a_max_tokens_that_fits_is_kept_and_reports_nothing(requested: int | None) -> None:
    limit = fit_max_tokens(requested, 342, 8192, strict=True, prompt_param="messages")
    assert limit.granted == requested and not limit.clamped and limit.headers() == {}


def test_strict_refuses_what_lenient_clamps_naming_the_numbers() -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_max_tokens(32000, 342, 8192, strict=True, prompt_param="messages")
    err = caught.value
    assert err.status == 400 and err.param == "max_tokens"
    assert all(str(n) in err.message for n in (8192, 32342, 342, 32000))
    assert openai_error(err)["error"]["type"] == "invalid_request_error"
    assert anthropic_error(err)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("prompt", [8192, 12900])
def test_a_prompt_that_fills_the_context_is_refused_either_way(strict: bool, prompt: int) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_max_tokens(32000, prompt, 8192, strict=strict, prompt_param="messages")
    assert caught.value.param == "messages"
    assert "8192" in caught.value.message and str(prompt) in caught.value.message


def test_a_prompt_one_short_of_the_context_gets_one_token() -> None:
    assert fit_max_tokens(None, 8191, 8192, strict=True, prompt_param="prompt").granted is None
    assert fit_max_tokens(500, 8191, 8192, strict=False, prompt_param="prompt").granted == 1


def test_strict_header_values() -> None:
    assert parse_strict(None) is None
    assert parse_strict("true") is True and parse_strict(" TRUE ") is True
    assert parse_strict("false") is False and parse_strict("0") is False
    with pytest.raises(InvalidRequest):
        parse_strict("maybe")


def test_an_overflow_on_the_anthropic_surface_is_in_anthropics_words() -> None:
    """Claude Code offers to compact on "prompt is too long" and lowers max_tokens from the
    numbers of "exceed context limit": the same overflows, worded as Anthropic's API words them."""
    with pytest.raises(ContextLengthExceeded) as full:
        fit_max_tokens(100, 8500, 8192, strict=False, prompt_param="messages")
    assert anthropic_error(full.value)["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 8500 tokens > 8191 maximum",
    }
    assert "your prompt has 8500 tokens" in openai_error(full.value)["error"]["message"]
    with pytest.raises(ContextLengthExceeded) as asked:
        fit_max_tokens(32000, 342, 8192, strict=True, prompt_param="messages")
    assert anthropic_error(asked.value)["error"]["message"] == (
        "input length and `max_tokens` exceed context limit: 342 + 32000 > 8192, decrease "
        "input length or `max_tokens` and try again"
    )
    with pytest.raises(ContextLengthExceeded) as chars:  # the neuron's check before tokenizing
        PromptPool.check_size(300_000, 8192, "messages")
    assert anthropic_error(chars.value)["error"]["message"] == (
        "prompt is too long: 300000 characters > 262144 maximum"
    )
    assert anthropic_wording("something else") == "prompt is too long: something else"
