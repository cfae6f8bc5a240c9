"""A neuron asked to load a model it does not know says what was probably meant, and how to give
a source (what `cortex models load` prints)."""

from __future__ import annotations

import pytest

from cortex.core.config import NeuronConfig
from cortex.core.errors import ModelNotFound
from cortex.core.fleet import LoadRequest
from cortex.neuron.runtime import NeuronRuntime


async def test_loading_a_typo_names_the_close_match() -> None:
    runtime = NeuronRuntime(NeuronConfig())  # the default catalogue
    with pytest.raises(ModelNotFound) as caught:
        await runtime.load(LoadRequest(model="smollm2-135m-instrct"))
    assert "did you mean smollm2-135m-instruct?" in caught.value.message
    assert "--source" in caught.value.message and "--preload MODEL=SOURCE" in caught.value.message
    with pytest.raises(ModelNotFound) as far:
        await runtime.load(LoadRequest(model="llama-70b"))
    assert "did you mean" not in far.value.message
