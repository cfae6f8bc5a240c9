"""Fixtures of the neuron's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.core.catalogue import DEFAULT_CATALOGUE, DEFAULT_CHAT_MODEL, resolve_alias


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """The default chat model's weights and tokenizer as the neuron serves them: its GGUF
    converted by the neuron's own loader into the session's cache, so the tests that read the real
    model and the real-path tests that serve it convert it once between them."""
    from cortex.neuron import loader, sources

    spec = resolve_alias(list(DEFAULT_CATALOGUE), DEFAULT_CHAT_MODEL)
    assert spec is not None
    local = sources.resolve(spec.source)
    directory, gguf_file = loader.materialize(local, model_cache, lambda _: None)
    assert gguf_file is None, f"the cache {model_cache} could not hold the conversion"
    return directory
