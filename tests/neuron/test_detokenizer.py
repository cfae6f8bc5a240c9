"""Incremental detokenization with the real SmolLM2 tokenizer, and stop-string matching."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cortex.neuron.detokenizer import Detokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    """The tokenizer the neuron serves SmolLM2 with (conftest.py)."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


def stream(tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detokenizer = Detokenizer(tokenizer, prompt or [])
    deltas = [detokenizer.add(t) for t in ids]
    return [*deltas, detokenizer.flush()]


def decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! This is plain ASCII.",
        "Héllo 世界 🎉🚀 naïve — ok 😀",
        "👩‍👩‍👧‍👦 family, 🇫🇷 flag, Ω≈ç√∫",
        "  leading spaces\n\tand tabs\n\n",
        "def f(x):\n    return {'a': [1, 2]}  # code",
    ],
)
def test_deltas_add_up_and_never_split_a_character(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, ids, prompt=tokenizer.encode("Say:", add_special_tokens=False))
    assert "".join(deltas) == decoded(tokenizer, ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_is_held_until_complete(tokenizer) -> None:
    ids = tokenizer.encode("a 🎉", add_special_tokens=False)
    assert len(ids) > 2  # the emoji spans several byte tokens
    detokenizer = Detokenizer(tokenizer, [])
    deltas = [detokenizer.add(t) for t in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == " 🎉"


def test_special_tokens_are_not_text(tokenizer) -> None:
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = [im_start, *tokenizer.encode("assistant\nHi!", add_special_tokens=False)]
    assert "".join(stream(tokenizer, ids)) == "assistant\nHi!"


def test_incomplete_tail_is_released_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas = stream(tokenizer, ids)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == decoded(tokenizer, ids)


def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.feed(p) for p in pieces)


def test_stop_string_across_deltas_is_cut_and_not_emitted() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("hello E") == "hello "  # "E" could start the stop string
    assert matcher.feed("N") == ""
    assert matcher.feed("D and more") == ""
    assert matcher.matched == "END"
    assert matcher.feed("later") == "" and matcher.flush() == ""


def test_held_text_that_turns_out_harmless_is_released() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("an E") == "an "
    assert matcher.feed("gg") == "Egg"
    assert matcher.feed("EN") == ""
    assert matcher.flush() == "EN"
    assert matcher.matched is None


def test_earliest_stop_string_wins() -> None:
    matcher = StopMatcher(("world", "lo w", "zzz"))
    assert feed(matcher, ["hel", "lo world"]) == "hel"
    assert matcher.matched == "lo w"


def test_no_stops_passes_everything_through() -> None:
    matcher = StopMatcher(("",))
    assert feed(matcher, ["a", "b", "c"]) == "abc"
    assert matcher.flush() == "" and matcher.matched is None


def test_stop_at_the_very_start() -> None:
    matcher = StopMatcher(("\n\n",))
    assert matcher.feed("\n") == ""
    assert matcher.feed("\nrest") == ""
    assert matcher.matched == "\n\n"
