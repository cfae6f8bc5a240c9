"""The `cortex` command line: help everywhere, env-var flags, config errors named by key."""

from __future__ import annotations

import socket
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


def test_connection_flags_also_come_after_the_action(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the README writes them: `cortex models list --endpoint URL`."""
    monkeypatch.setenv("CORTEX_ENDPOINT", "http://from-env:1")
    for argv in (["models", "list"], ["keys", "reset", "ci"], ["neurons", "cordon", "gpu-1"]):
        after = _parser().parse_args([*argv, "--endpoint", "http://after:1", "--api-key", "k"])
        assert (after.endpoint, after.api_key) == ("http://after:1", "k")
        assert _parser().parse_args(argv).endpoint == "http://from-env:1"  # absent: untouched
    before = _parser().parse_args(["models", "--endpoint", "http://before:1", "list"])
    assert before.endpoint == "http://before:1"


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_port_out_of_range_is_one_line_not_a_traceback(port: str) -> None:
    done = _cortex("neuron", "--port", port)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --port:" in done.stderr.splitlines()[-1]


def test_an_admin_token_file_flag_wins_over_the_token_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cortex.cli.commands import neuron_config

    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "from-env")
    flagged = _parser().parse_args(["neuron", "--admin-token-file", str(token_file)])
    assert neuron_config(flagged).neuron.admin_secret() == "from-file"
    unflagged = _parser().parse_args(["neuron"])  # no flag: the variable
    assert neuron_config(unflagged).neuron.admin_secret() == "from-env"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (b"\xff\xfe[gateway]\n", "not UTF-8 text"),
        (b'[models]\nid = "x"\n', "models: expected [[models]] entries"),
        (b'[[models]]\nid = "x"\nsource = "pkg:a/b"\n[aliases]\ny = ["x"]\n', "aliases.y: expected a model id"),
        (b'[gateway]\nlisten = "127.0.0.1:1"\n[[neuron]]\nname = "a"\n', "neuron: unknown key"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line_naming_the_key(
    tmp_path: Path, text: bytes, said: str
) -> None:
    path = tmp_path / "cortex.toml"
    path.write_bytes(text)
    done = _cortex("config", "check", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert said in done.stderr


def test_an_ipv6_listen_address_is_checked_without_its_brackets() -> None:
    """cortex.toml writes `[::1]:port`; bind() takes `::1` ("Name or service not known" else)."""
    from cortex.cli.commands import check_gateway_ports
    from cortex.core.config import GatewayConfig, GatewaySection

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    section = GatewaySection(listen=f"[::1]:{port}", metrics_listen=None)
    check_gateway_ports(GatewayConfig(gateway=section))  # free: no error


def test_host_does_not_move_a_metrics_listen_the_config_chose(tmp_path: Path) -> None:
    """The metrics port has no key: `--host 0.0.0.0` opens the API, not a metrics port that
    cortex.toml keeps on loopback; with no metrics_listen in the file, it moves both."""
    from cortex.cli.commands import gateway_config

    chosen = tmp_path / "chosen.toml"
    chosen.write_text('[gateway]\nmetrics_listen = "127.0.0.1:9100"\n')
    plain = tmp_path / "plain.toml"
    plain.write_text("[gateway]\n")
    args = _parser().parse_args(["gateway", "--host", "0.0.0.0", "--config", str(chosen)])
    config = gateway_config(args)
    assert (config.gateway.listen, config.gateway.metrics_listen) == (
        "0.0.0.0:31313",
        "127.0.0.1:9100",
    )
    args = _parser().parse_args(["gateway", "--host", "0.0.0.0", "--config", str(plain)])
    config = gateway_config(args)
    assert (config.gateway.listen, config.gateway.metrics_listen) == (
        "0.0.0.0:31313",
        "0.0.0.0:31314",
    )
