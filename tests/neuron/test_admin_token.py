"""The neuron's admin token: from a file (not argv), always set for `cortex up`'s neuron, and a
neuron left open beyond loopback says so at start-up, in /status and in a metric."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cortex.cli import commands
from cortex.cli.main import _parser
from cortex.core.config import NeuronConfig
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app


def test_the_token_comes_from_a_file_and_a_rotation_needs_no_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("first-token\n")
    config = commands.neuron_config(
        _parser().parse_args(["neuron", "--admin-token-file", str(secret)])
    )
    assert config.neuron.admin_secret() == "first-token"
    secret.write_text("second-token")  # the Secret was rotated
    assert config.neuron.admin_secret() == "second-token"
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN_FILE", str(secret))
    from_env = commands.neuron_config(_parser().parse_args(["neuron"]))
    assert from_env.neuron.admin_secret() == "second-token" and not from_env.neuron.lifecycle_open


def test_a_token_variable_ending_in_a_newline_is_the_token_the_operator_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret made with --from-file keeps the file's newline: the neuron gets it in
    CORTEX_ADMIN_TOKEN, the operator reads the same Secret mounted as a file (the chart)."""
    from cortex.operator.config import read_admin_token

    mounted = tmp_path / "token"
    mounted.write_text("s3cret\n")
    monkeypatch.delenv("CORTEX_ADMIN_TOKEN", raising=False)
    sent = read_admin_token(str(mounted))
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "s3cret\n")
    expected = commands.neuron_config(_parser().parse_args(["neuron"])).neuron.admin_secret()
    assert expected == sent == "s3cret"
    assert read_admin_token(None) == "s3cret"  # the operator given the variable instead
    assert _parser().parse_args(["models", "list"]).admin_token == "s3cret"  # and the CLI


def test_cortex_up_gives_its_neuron_a_random_token_and_the_gateway_the_same() -> None:
    args = _parser().parse_args(["up"])
    first, second = commands.in_process_neuron(args), commands.in_process_neuron(args)
    token = first.neuron.admin_secret()
    assert token and len(token) >= 32 and token != second.neuron.admin_secret()
    assert commands.local_entry(first, 4242).admin_token == token


async def test_an_in_process_neuron_refuses_loads_without_its_token(tmp_path: Path) -> None:
    config = commands.in_process_neuron(_parser().parse_args(["up"]))
    config.neuron.cache_dir = tmp_path
    app = create_app(NeuronRuntime(config, catalogue=[]), manage_runtime=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://n") as http:
        refused = await http.post("/models/load", json={"model": "x", "source": "file:/x"})
        assert refused.status_code == 401


@pytest.mark.parametrize(("host", "token", "open_"), [
    ("0.0.0.0", None, True),
    ("10.1.2.3", None, True),
    ("127.0.0.1", None, False),
    ("localhost", None, False),
    ("0.0.0.0", "s3cret-admin", False),
])  # fmt: skip
async def test_an_open_lifecycle_is_reported_loudly(
    host: str, token: str | None, open_: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = NeuronConfig.model_validate(
        {"neuron": {"host": host, "admin_token": token, "cache_dir": str(tmp_path)}}
    )
    runtime = NeuronRuntime(config, catalogue=[])
    app = create_app(runtime, manage_runtime=False)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://n") as http:
            status = (await http.get("/status")).json()
            exposition = (await http.get("/metrics")).text
    finally:
        await runtime.stop()
    assert status["lifecycle_open"] is open_
    samples = {
        s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples
    }
    assert samples["cortex_neuron_lifecycle_open"] == float(open_)
    warned = [r for r in caplog.records if "NO ADMIN TOKEN" in r.getMessage()]
    assert bool(warned) is open_ and all(r.levelno == logging.WARNING for r in warned)
    assert not token or token not in caplog.text


@pytest.mark.parametrize("token", ["s3cret-admin", "caf\xe9-admin"])
async def test_a_token_that_is_not_ascii_is_compared_as_bytes(token: str, tmp_path: Path) -> None:
    """A bearer that is not ASCII is a 401 (compare_digest refused it as text: a 500), and a
    token that is not ASCII matches the bytes a client sends for it."""
    config = NeuronConfig.model_validate(
        {"neuron": {"admin_token": token, "cache_dir": str(tmp_path)}}
    )
    app = create_app(NeuronRuntime(config, catalogue=[]), manage_runtime=False)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    body = {"model": "x", "source": "file:/nowhere"}
    async with httpx.AsyncClient(transport=transport, base_url="http://n") as http:
        for wrong in ("Bearer caf\xe9", "Bearer \xff\xfe"):
            headers = {"authorization": wrong.encode("latin-1")}
            refused = await http.post("/models/load", json=body, headers=headers)
            assert refused.status_code == 401, refused.text
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            named = {**headers, "x-cortex-principal": "p"}
            assert (
                await http.post("/v1/chat/completions", json=chat, headers=named)
            ).status_code == 404
        right = {"authorization": f"Bearer {token}".encode()}
        past_the_token = await http.post("/models/load", json=body, headers=right)
        assert past_the_token.status_code == 404  # the source is missing: the token was taken
