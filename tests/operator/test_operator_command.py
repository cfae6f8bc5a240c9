"""`cortex operator`: its flags, its help, and kopf staying out of every other command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cortex.cli.main import _parser, main
from cortex.operator.cli import config_from_args

pytestmark = pytest.mark.timeout(60)


def test_help_explains_flags_and_login(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["operator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needed in (
        "service account", "kubeconfig", "CORTEX_ADMIN_TOKEN", "--namespace", "--all-namespaces",
        "--neuron-selector", "--admin-token-file", "--probe-interval", "--peering",
        "--standalone", "CORTEX_PROBE_INTERVAL",
    ):  # fmt: skip
        assert needed in text


def test_flags_and_environment_make_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("CORTEX_PROBE_INTERVAL", "2.5")
    monkeypatch.delenv("CORTEX_ADMIN_TOKEN", raising=False)
    token = tmp_path / "token"  # type: ignore[operator]
    token.write_text("s3cret\n")
    args = _parser().parse_args(
        ["operator", "--namespace", "cortex", "--neuron-selector", "app=n,tier=gpu",
         "--admin-token-file", str(token), "--peering", "cortex-operator", "--priority", "7"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.namespaces == ("cortex",)
    assert config.neuron_selector == {"app": "n", "tier": "gpu"}
    assert (config.admin_token, config.probe_interval) == ("s3cret", 2.5)
    assert (config.peering, config.standalone, config.priority) == ("cortex-operator", False, 7)
    assert config.liveness == "http://0.0.0.0:8080/healthz"
    everywhere = config_from_args(
        _parser().parse_args(["operator", "--all-namespaces", "--standalone", "--liveness", "off"])
    )
    assert (everywhere.namespaces, everywhere.standalone, everywhere.liveness) == ((), True, None)
    assert config.metrics_port == 31315  # the operator's /metrics, unless told otherwise
    off = config_from_args(_parser().parse_args(["operator", "--metrics-port", "0"]))
    assert off.metrics_port is None


def test_a_bad_metrics_port_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "--metrics-port", "http"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cortex operator: --metrics-port 'http': not a port number (0 turns the metrics off)"
    )


def test_contradicting_flags_are_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "--peering", "p", "--standalone"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "cortex operator: --peering and --standalone exclude each other"
    )


def test_a_priority_without_peers_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "--priority", "3", "--standalone"]) == 2
    assert "--priority is a peer's" in capsys.readouterr().err


def test_other_commands_never_import_kopf() -> None:
    code = (
        "import sys; from cortex.cli.main import _parser; _parser(); print('kopf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_credentials_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))  # type: ignore[operator]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["operator", "--standalone"]) == 2
    assert "no Kubernetes credentials" in capsys.readouterr().err


def test_an_api_request_is_given_up_long_before_kopfs_five_minutes() -> None:
    """A request on a connection dropped without a word waits for its timeout, then kopf
    retries it: 30 s, not aiohttp's 5 minutes (a peer's shutdown once waited them out)."""
    from cortex.operator.cli import operator_settings
    from cortex.operator.config import OperatorConfig

    settings = operator_settings(OperatorConfig())
    assert settings.networking.request_timeout == 30.0
    assert settings.networking.connect_timeout == 10.0
    assert operator_settings(OperatorConfig(api_timeout=5.0)).networking.connect_timeout == 5.0
