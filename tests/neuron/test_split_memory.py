"""A model split over several GPUs may use the memory it committed on each before loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cortex.neuron import loader
from cortex.neuron.devices import Device

GiB = 2**30


def test_a_split_model_is_capped_at_what_is_free_with_its_own_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: two stand-in cards; on the second, another process holds 2 GiB.
    driver_free = {0: 10 * GiB, 1: 8 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (driver_free[index], 10 * GiB))
    gpus = [Device(f"cuda-dev-{i}", i, "cuda", "stand-in", 10 * GiB) for i in (0, 1)]
    gpus[0].committed = 1 * GiB  # another model
    share = 3 * GiB
    for gpu in gpus:  # as the runtime commits this model's share before loading it
        gpu.committed += share
    assert loader.split_memory(gpus, share) == {0: 9 * GiB, 1: 8 * GiB}

    heard: dict[str, Any] = {}

    def from_pretrained(directory: Path, **kwargs: Any) -> None:
        heard.update(kwargs)

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loader._from_pretrained(Path("/nowhere"), None, gpus, "bfloat16", share)
    assert heard["device_map"] == "auto" and heard["max_memory"] == {0: 9 * GiB, 1: 8 * GiB}
