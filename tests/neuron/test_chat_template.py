"""Rendering a conversation for a model that has no chat template (a base model)."""

from __future__ import annotations

from types import SimpleNamespace

from cortex.neuron.chat_template import render_chat


def test_a_base_model_transcript_continues_or_opens_the_assistant_turn() -> None:
    plain = SimpleNamespace(chat_template=None)  # a base model: no template, a plain transcript
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1, 2,"}]
    assert render_chat(plain, messages, None) == "user: Count.\nassistant: 1, 2,\nassistant:"
    assert (
        render_chat(plain, messages, None, continue_final=True) == "user: Count.\nassistant: 1, 2,"
    )
    assert render_chat(plain, messages[:1], None, generation_prompt=False) == "user: Count."
