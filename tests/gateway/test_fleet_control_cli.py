"""`cortex models`, `cortex neurons` and `cortex status` against a gateway over fake neurons, and
`cortex models` still against a neuron's own endpoint (docs/fleet-control.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.neuron import FakeModel, FakeNeuron, GiB
from gateway_cluster import cluster, spec

from cortex.cli import commands
from cortex.cli.fleet_control import duration
from cortex.cli.main import _parser
from cortex.core.errors import CortexError
from cortex.core.fleet import ModelState

LONG = "a-model-with-a-name-far-too-long-for-any-column-of-an-80-column-terminal"
CATALOGUE = [spec("chat-a", idle_ttl=300), spec("chat-b", idle_ttl=3600), spec(LONG)]


def args(*argv: str) -> argparse.Namespace:
    parsed = _parser().parse_args(list(argv))
    parsed.endpoint = parsed.endpoint or "http://127.0.0.1:9"
    return parsed


async def test_status_lists_every_model_with_until_in_80_columns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    neuron = FakeNeuron("gpu-1", loaded={"chat-a": GiB})
    async with cluster(neuron, catalogue=CATALOGUE) as c:
        assert await commands.status(c.url) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    row = next(line for line in lines if line.startswith("chat-a"))
    assert "ready" in row and "gpu-1" in row and "in 4m" in row  # expires in under 5 minutes
    unloaded = next(line for line in lines if line.startswith("chat-b"))
    assert "not loaded" in unloaded and "ttl 60m00s" in unloaded
    assert any(line.startswith("a-model-with") for line in lines)  # cut, not dropped


async def test_status_says_why_a_model_failed(capsys: pytest.CaptureFixture[str]) -> None:
    oom = "needs 9000 MiB; cpu-0 has 800 MiB free"
    neuron = FakeNeuron("gpu-1", loaded={"chat-a": GiB})
    neuron.models["chat-b"] = FakeModel("chat-b", 0, state=ModelState.FAILED, error=oom)
    async with cluster(neuron, catalogue=CATALOGUE) as c:
        assert await commands.status(c.url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("chat-b on gpu-1 failed: needs 9000 MiB" in line for line in lines), lines


async def test_models_load_pin_cordon_through_the_gateway(
    capsys: pytest.CaptureFixture[str],
) -> None:
    n1, n2 = FakeNeuron("gpu-1"), FakeNeuron("gpu-2")
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        cordon = args("neurons", "--endpoint", c.url, "cordon", "gpu-2")
        assert await commands.models(cordon) == 0
        load = args("models", "--endpoint", c.url, "load", "chat-b")
        assert await commands.models(load) == 0
        assert "chat-b" in n1.models and not n2.loads  # gpu-2 is cordoned
        pin = args("models", "--endpoint", c.url, "pin", "chat-a", "--neuron", "gpu-1")
        assert await commands.models(pin) == 0
        listed = args("models", "--endpoint", c.url, "list")
        assert await commands.models(listed) == 0
        with pytest.raises(CortexError, match="did you mean chat-b"):
            await commands.models(args("models", "--endpoint", c.url, "unload", "chat-bb"))
    out = capsys.readouterr().out
    assert "cordoned gpu-2" in out and "chat-b ready on gpu-1" in out
    assert "chat-a is pinned on gpu-1" in out


async def test_models_still_talk_to_a_neuron_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    neuron = FakeNeuron("gpu-1", loaded={"chat-a": GiB}, available={"chat-b": GiB})
    async with cluster(neuron, catalogue=CATALOGUE) as c:
        direct = c.served["gpu-1"].url
        assert await commands.models(args("models", "--endpoint", direct, "list")) == 0
        with pytest.raises(CortexError, match="needs a gateway"):
            await commands.models(
                args("models", "--endpoint", direct, "pin", "chat-a", "--neuron", "gpu-1")
            )
    out = capsys.readouterr().out
    assert "chat-a" in out and "chat-b" in out and "not loaded" in out


def test_durations_read_like_ollama_ps() -> None:
    assert [duration(s) for s in (5, 89, 300, 3600, 7260)] == [
        "5s",
        "89s",
        "5m00s",
        "60m00s",
        "2h01m",
    ]


async def test_status_watch_redraws_under_a_terminal_until_interrupted() -> None:
    """`cortex status --watch` in a pseudo-terminal: a cordon made meanwhile shows up, Ctrl-C
    (SIGINT) ends it quietly."""
    async with cluster(FakeNeuron("gpu-1", loaded={"chat-a": GiB}), catalogue=CATALOGUE) as c:
        main, terminal = pty.openpty()
        env = {**os.environ, "COLUMNS": "80", "LINES": "40", "TERM": "xterm"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cortex.cli", "status", "--endpoint", c.url, "--watch", "0.2",
            stdout=terminal, stderr=terminal, env=env,
        )  # fmt: skip
        os.close(terminal)
        screen = bytearray()

        async def shown(text: bytes) -> None:
            deadline = time.monotonic() + 30
            while text not in screen:
                assert time.monotonic() < deadline, bytes(screen)[-2000:]
                readable, _, _ = await asyncio.to_thread(select.select, [main], [], [], 0.2)
                if readable:
                    screen.extend(os.read(main, 65536))

        try:
            await shown(b"chat-a")
            await c.http.post("/admin/neurons/gpu-1/cordon")
            await shown(b"cordoned")  # redrawn with what changed
            process.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
            os.close(main)
    assert code in (0, 130) and b"Traceback" not in screen


def test_serve_is_the_gateway_under_the_seeds_name(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text("[eviction]\nstrategy = 'random'\n")
    served = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert served.returncode == 2  # the gateway's own config check answered
    assert "eviction.strategy" in served.stderr and str(config) in served.stderr
