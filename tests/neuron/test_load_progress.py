"""A load's progress moves while the weights are read, not 0 then 1 (docs/fleet-control.md): the
loader tells every stage and, mapped, every tensor. Recorded from the callback, not by timing."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import MINILM, make_tiny_llama

from cortex.neuron.devices import Device
from cortex.neuron.loader import load_weights
from cortex.neuron.sources import LocalModel

CPU = Device("cpu-0", 0, "cpu", "test cpu", 2**30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def moves(heard: list[float]) -> None:
    """Never back, never past 1, and many steps strictly between 0 and 1."""
    assert heard == sorted(heard)
    assert all(0.0 <= value <= 1.0 for value in heard)
    assert len({value for value in heard if 0.0 < value < 1.0}) >= 5, heard


def test_a_mapped_chat_load_tells_each_tensor(tiny: Path, tmp_path: Path) -> None:
    heard: list[float] = []
    weights = load_weights(
        LocalModel("tiny", "hf", tiny), "chat", [CPU], "float32", tmp_path, heard.append
    )
    assert weights.kind == "chat"
    moves(heard)
    tensors = sum(1 for _ in weights.model.state_dict())
    between = [v for v in heard if 0.6 < v <= 0.85]  # the tensors' share of the load
    assert len(between) >= tensors - 1  # a tied head shares the embedding's tensor


def test_an_embedding_load_tells_its_stages(tmp_path: Path) -> None:
    heard: list[float] = []
    load_weights(LocalModel("minilm", "hf", MINILM), "embedding", [CPU], "float32", tmp_path,
                 heard.append)  # fmt: skip
    assert heard == sorted(heard) and len({v for v in heard if 0.0 < v < 1.0}) >= 4, heard
