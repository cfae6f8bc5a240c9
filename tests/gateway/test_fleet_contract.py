"""GET /fleet as a typed contract (cortex.core.fleet.FleetView): what the gateway sends is what the
fleet page reads and what `cortex status` parses into its table."""

from __future__ import annotations

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import cluster, spec
from pydantic import ValidationError
from rich.console import Console

from cortex.cli.commands import fleet_rows
from cortex.cli.console import print_fleet
from cortex.core.fleet import FleetView, ModelState

CATALOGUE = [spec("chat-a", aliases=["a"]), spec("embed", kind="embedding")]


async def test_the_fleet_body_is_a_fleet_view_the_cli_draws() -> None:
    async with cluster(FakeNeuron("n1", loaded={"chat-a": GiB}), catalogue=CATALOGUE) as c:
        body = (await c.http.get("/fleet")).json()
        view = FleetView.model_validate(body)
    assert view.status == "ok"
    (n1,) = view.neurons
    assert n1.healthy and n1.last_seen and n1.devices[0].memory_total == 8 * GiB
    assert [(r.id, r.state) for r in n1.replicas] == [("chat-a", ModelState.READY)]
    # The page reads the gateway's own card fields: they travel, though core types a plain card.
    cards = {m["id"]: m for m in body["models"]}
    assert cards["chat-a"]["locations"] == ["n1"] and cards["chat-a"]["aliases"] == ["a"]
    assert cards["embed"]["state"] == "available" and "context_length" in cards["embed"]
    assert view.model_dump(mode="json") == body  # nothing dropped by the typed round trip

    console = Console(record=True, width=160)
    print_fleet(fleet_rows(view), console)
    text = console.export_text()
    assert "n1" in text and "chat-a" in text and "ready" in text


@pytest.mark.parametrize(
    "body", [{"neurons": []}, {"status": "fine"}, {"status": "ok", "neurons": [{}]}]
)
def test_a_body_of_another_shape_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FleetView.model_validate(body)
