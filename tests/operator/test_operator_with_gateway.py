"""The operator and the gateway together, as the chart runs them: a client asks the gateway for a
min-0 model, the gateway writes the demand annotation, the operator loads a replica, the gateway
routes the request to it. The Kubernetes API is kmock's emulator over HTTP; the neuron is a fake."""

from __future__ import annotations

import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB, running
from operator_harness import NEURONS, NS, PLACEMENTS, Kube, Operator, neuron, placement, until

from cortex.core.config import GatewayConfig
from cortex.core.kube_api import KubeLogin
from cortex.core.resources import DEMAND_ANNOTATION
from cortex.gateway.app import create_app
from cortex.gateway.assembly import Tuning

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_client_waiting_for_a_min_zero_model_gets_an_answer(
    kube: Kube, operator: Operator
) -> None:
    fake = FakeNeuron("n1", available={"lazy": GiB}, reply="Loaded for you.")
    config = GatewayConfig.model_validate({"gateway": {"load_timeout": 60}})
    login = KubeLogin(server=kube.url, namespace=NS, token="test-token")
    app = create_app(config, [], tuning=Tuning(demand_interval=60.0), kubernetes=login)
    async with running(fake.app) as served, operator(), running(app, lifespan="on") as gateway:
        await kube.create(NEURONS, neuron("n1", served.url))
        await kube.create(PLACEMENTS, placement("lazy", "lazy", replicas={"min": 0, "max": 1}))
        await until(lambda: kube.status(PLACEMENTS, "lazy").get("phase") == "Idle", "Idle")
        assert fake.loads == []
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            body = {"model": "lazy", "messages": [{"role": "user", "content": "hi"}]}
            answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Loaded for you."
        assert [load.model for load in fake.loads] == ["lazy"]
        assert kube.status(PLACEMENTS, "lazy")["phase"] == "Ready"
        await until(
            lambda: (
                DEMAND_ANNOTATION
                not in kube.get(PLACEMENTS, "lazy")["metadata"].get("annotations", {})
            ),
            "the served demand to be removed",
        )
