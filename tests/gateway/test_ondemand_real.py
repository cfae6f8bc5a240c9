"""On-demand loading through the gateway over a real neuron (real server, runtime and loaders, tiny
random-weight Llamas) whose memory holds one model: a model of unknown size, never seen ready, is
sent on a guess; the neuron's refusal says what it needs, and the gateway evicts the cold model
for it (docs/architecture.md, "The placement kernel")."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import httpx
import pytest
from fakes.neuron import running
from gateway_cluster import FAST, chat_body, eventually

from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig, NeuronConfig
from cortex.core.fleet import ModelState
from cortex.gateway.app import create_app
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app as create_neuron_app

sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
from tiny_models import make_tiny_llama

# One tiny Llama takes about 16 MB once ready on a CPU (the neuron's estimate before loading is
# 12 MB): room for one, not two.
NEURON_MEMORY = "24MiB"


async def test_a_model_of_unknown_size_evicts_the_cold_one_on_a_real_neuron(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.gateway.placer")
    sources = {name: f"file:{make_tiny_llama(tmp_path / name)}" for name in ("a", "b")}
    neuron_config = NeuronConfig.model_validate(
        {
            "neuron": {
                "name": "n1",
                "cache_dir": str(tmp_path / "cache"),
                "cpu_memory": NEURON_MEMORY,
                "allowed_paths": [str(tmp_path)],
            }
        }
    )
    runtime = NeuronRuntime(neuron_config, catalogue=[])
    # No `memory` in the catalogue: the gateway knows neither size before it sees it.
    catalogue = [ModelSpec(id=name, source=source) for name, source in sources.items()]
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {
                "gateway": {"poll_interval": 0.05, "load_timeout": 120},
                "neurons": [{"name": "n1", "endpoint": neuron.url}],
            }
        )
        app = create_app(config, catalogue, tuning=FAST)
        async with (
            running(app, lifespan="on") as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=120) as http,
        ):
            body = chat_body("a", max_tokens=2)
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            fleet = app.state.gateway.fleet
            await eventually(lambda: "a" in fleet.sizes)  # seen ready: a's size is known

            answer = await http.post("/v1/chat/completions", json=chat_body("b", max_tokens=2))
            assert answer.status_code == 200, answer.text
            assert runtime.replicas["b"].state == ModelState.READY
            assert "a" not in runtime.replicas  # evicted for b
            # b went out on a guess first, and the neuron's refusal said what it needs.
            assert "n1 refused b for room: it needs 12 MiB" in caplog.text
