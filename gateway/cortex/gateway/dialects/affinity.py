"""Affinity keys: what makes two requests "the same conversation", so that the balancer
(proxy/balancer.py) sends them where the neuron's prefix cache already holds its head. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cortex.core.protocol.openai import ChatMessage

# Prompt characters that identify a plain completion's "conversation".
COMPLETION_PREFIX_CHARS = 512


def conversation_key(messages: Sequence[ChatMessage]) -> str:
    """Hash of a conversation's head: system messages up to and including the first user turn.

    Every later turn of the same conversation repeats that head, so all turns share the key and
    land where the neuron's prefix cache already holds it.
    """
    digest = hashlib.sha256()
    for message in messages:
        digest.update(f"{message.role}\0{message.text()}\0".encode())
        if message.role == "user":
            break
    return digest.hexdigest()


def prompt_key(prompt: str) -> str:
    """Affinity key of a plain completion: its prompt's first characters."""
    return hashlib.sha256(prompt[:COMPLETION_PREFIX_CHARS].encode()).hexdigest()
