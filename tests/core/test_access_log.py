"""Access logs keep paths and drop query strings (where keys and tokens end up), in every server
cortex starts: the gateway's, `cortex neuron`'s and `cortex up`'s."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fakes.neuron import running
from fastapi import FastAPI

from cortex.cli import commands
from cortex.core.access_log import ACCESS_LOGGER, AccessLine, RedactQuery, redact_access_log
from cortex.core.config import GatewayConfig, NeuronConfig
from cortex.core.request_context import RequestContext
from cortex.gateway import app as gateway_app

SECRET = "sk-query-secret-123"
TOKEN = "neuron-admin-token-456"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def access() -> Iterator[Lines]:
    """Formatted lines of uvicorn's access logger (attach() once uvicorn configured it), with no
    redaction installed beforehand."""
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = list(logger.filters)
    for existing in saved:
        logger.removeFilter(existing)
    handler = Lines()
    yield handler
    logger.removeHandler(handler)
    for existing in list(logger.filters):
        logger.removeFilter(existing)
    for existing in saved:
        logger.addFilter(existing)


async def test_query_strings_never_reach_the_access_log(access: Lines) -> None:
    app = FastAPI()
    app.add_api_route("/v1/models", lambda: {"data": []}, methods=["GET"])
    async with running(app) as live:
        redact_access_log()  # after uvicorn.Config configured its loggers, as cortex does
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
        logging.getLogger(ACCESS_LOGGER).addHandler(access)
        async with httpx.AsyncClient(base_url=live.url) as http:
            await http.get(f"/v1/models?api_key={SECRET}&token={TOKEN}")
            await http.get("/v1/models")
    logged = "\n".join(access.lines)
    assert "/v1/models?[redacted]" in logged and '"GET /v1/models HTTP/1.1" 200' in logged
    assert SECRET not in logged and TOKEN not in logged


async def test_only_a_neurons_state_polls_are_left_out(access: Lines) -> None:
    """cortex's own agent keeps the gateway's polls of a neuron's state out of its log; anyone
    can send that agent, so it hides nothing else, and nothing at all on the gateway."""
    gateway = gateway_app.create_app(GatewayConfig.model_validate({"neurons": []}), [])
    neuron = FastAPI()
    for path in ("/status", "/v1/models"):
        neuron.add_api_route(path, lambda: {}, methods=["GET"])
    agent = {"user-agent": "cortex-gateway/1"}
    async with (
        running(gateway, lifespan="on") as gateway_live,
        running(RequestContext(neuron)) as neuron_live,
    ):
        redact_access_log()
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
        logging.getLogger(ACCESS_LOGGER).addHandler(access)
        async with httpx.AsyncClient(headers=agent) as http:
            for path in ("/livez", "/v1/models", "/health"):
                await http.get(gateway_live.url + path)
            for path in ("/status", "/v1/models"):
                await http.get(neuron_live.url + path)
    logged = "\n".join(access.lines)
    for path in ("/livez", "/v1/models", "/health"):
        assert f'"GET {path} HTTP/1.1"' in logged
    assert logged.count('"GET /v1/models HTTP/1.1"') == 2  # the gateway's and the neuron's
    assert "/status" not in logged


def _installed() -> bool:
    return any(isinstance(f, RedactQuery) for f in logging.getLogger(ACCESS_LOGGER).filters)


async def _no_serving(self: uvicorn.Server, sockets: object = None) -> None:
    self.started = True


async def test_every_cortex_server_installs_the_redaction(
    access: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uvicorn.Server, "serve", _no_serving)
    await gateway_app.serve(GatewayConfig(), [])
    assert _installed()
    logging.getLogger(ACCESS_LOGGER).filters.clear()
    await commands.serve(FastAPI(), "127.0.0.1", 0)
    assert _installed()


def test_configs_never_print_their_secrets() -> None:
    """A config logged or shown in a traceback (repr) keeps keys and admin tokens out."""
    gateway = GatewayConfig.model_validate(
        {
            "neurons": [{"name": "n", "endpoint": "http://n:1", "admin_token": TOKEN}],
            "auth": {"neuron_admin_token": TOKEN, "keys": [{"name": "a", "key": SECRET}]},
        }
    )
    neuron = NeuronConfig.model_validate({"neuron": {"admin_token": TOKEN}})
    shown = f"{gateway!r} {gateway} {neuron!r} {neuron}"
    assert SECRET not in shown and TOKEN not in shown and "'a'" in shown


def test_the_lean_access_line_reads_as_uvicorns() -> None:
    """cortex swaps uvicorn's access formatter for a cheaper one: the lines must not change."""
    uvicorn.Config(FastAPI())  # sets uvicorn's access handler and formatter up
    handler = logging.getLogger(ACCESS_LOGGER).handlers[0]
    uvicorns = handler.formatter
    assert uvicorns is not None
    redact_access_log()
    assert isinstance(handler.formatter, AccessLine)
    fmt = '%s - "%s %s HTTP/%s" %d'
    for args in (
        ("127.0.0.1:5000", "POST", "/v1/chat/completions", "1.1", 200),
        ("[::1]:80", "GET", "/v1/models?[redacted]", "1.1", 404),
        ("10.0.0.1:1", "GET", "/x", "1.0", 599),  # no phrase
    ):
        record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, fmt, args, None)
        assert handler.format(record) == uvicorns.format(record)
    warned = logging.LogRecord(ACCESS_LOGGER, logging.WARNING, __file__, 1, fmt, args, None)
    assert handler.format(warned) == uvicorns.format(warned)  # uvicorn's own, other prefix
