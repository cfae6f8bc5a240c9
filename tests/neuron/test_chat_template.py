"""Rendering a conversation without a chat template (a base model), and naming tokens' bytes."""

from __future__ import annotations

from types import SimpleNamespace

from cortex.neuron.chat_template import render_chat
from cortex.neuron.logprobs import token_bytes


def test_a_base_model_transcript_continues_or_opens_the_assistant_turn() -> None:
    plain = SimpleNamespace(chat_template=None)  # a base model: no template, a plain transcript
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1, 2,"}]
    assert render_chat(plain, messages, None) == "user: Count.\nassistant: 1, 2,\nassistant:"
    assert (
        render_chat(plain, messages, None, continue_final=True) == "user: Count.\nassistant: 1, 2,"
    )
    assert render_chat(plain, messages[:1], None, generation_prompt=False) == "user: Count."


def test_token_bytes_of_byte_level_and_sentencepiece_pieces() -> None:

    pieces = {1: "ðŁ", 2: "<0xE2>", 3: "▁the", 4: "Ġthe"}
    tokenizer = SimpleNamespace(convert_ids_to_tokens=pieces.__getitem__)
    assert token_bytes(tokenizer, 1, "\ufffd") == b"\xf0\x9f"  # byte-level: part of a character
    assert token_bytes(tokenizer, 2, "\ufffd") == b"\xe2"  # SentencePiece's byte fallback
    assert token_bytes(tokenizer, 3, " the") == b" the"
    assert token_bytes(tokenizer, 4, " the") == b" the"  # whole characters: their text
