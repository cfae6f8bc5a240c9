"""The `cortex` command line: help everywhere, env-var flags, config errors named by key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cortex.cli.main import _parser, main


def _cortex(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["up", "neuron", "gateway", "status", "models", "bench"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cortex" in out
    if command in ("up", "neuron", "gateway"):
        assert "CORTEX_PORT" in out and "CORTEX_CONFIG" in out


def test_flags_default_to_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_PORT", "4242")
    monkeypatch.setenv("CORTEX_PRELOAD", "a, b")
    args = _parser().parse_args(["neuron"])
    assert args.port == 4242 and args.preload == ["a", "b"]
    assert _parser().parse_args(["neuron", "--port", "7"]).port == 7  # the flag wins


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text("[eviction]\nstrategy = 'random'\n")
    result = _cortex("gateway", "--config", str(config))
    assert result.returncode == 2
    assert "eviction.strategy" in result.stderr and str(config) in result.stderr


def test_status_of_an_unreachable_endpoint_fails_cleanly() -> None:
    result = _cortex("status", "--endpoint", "http://127.0.0.1:9")
    assert result.returncode == 1 and "cannot reach" in result.stderr
