"""The fleet table of `cortex status` (U1)."""

from __future__ import annotations

from rich.console import Console

from cortex.cli.console import NeuronRow, bar, print_fleet
from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus

GIB = 2**30


def test_bar() -> None:
    assert bar(0, 10) == "[..........]   0%"
    assert bar(5, 10) == "[#####.....]  50%"
    assert bar(3, 0).startswith("[..........]")


def test_table_shows_devices_memory_models_and_states() -> None:
    device = DeviceStatus(
        id="cuda-dev-0", index=0, kind="cuda", name="H100", memory_total=80 * GIB,
        memory_free=60 * GIB, memory_used=20 * GIB,
    )  # fmt: skip
    models = [
        LoadedModel(
            id="chat", source="", state=ModelState.READY, devices=["cuda-dev-0"], in_flight=3
        ),
        LoadedModel(
            id="big", source="", state=ModelState.LOADING, devices=["cuda-dev-0"], progress=0.4
        ),
    ]
    status = NeuronStatus(node="gpu-a", version="0", devices=[device], models=models)
    console = Console(record=True, width=160)
    print_fleet(
        [NeuronRow("gpu-a", "", True, status), NeuronRow("gpu-b", "", False, None)], console
    )
    text = console.export_text()
    assert "[##........]  25% 20.0G/80.0G" in text
    assert "ready (3 in flight)" in text and "loading 40%" in text
    assert "gpu-b (unhealthy)" in text and text.count("cuda-dev-0") == 1
