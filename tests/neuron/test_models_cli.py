"""`cortex models list|load|unload` against a real neuron (a tiny random-weight model, real loaders)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import serve
from tiny_models import make_tiny_llama

from cortex.core.config import NeuronConfig
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app

TOKEN = "admin-secret"


@pytest.fixture(scope="module")
def neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache = tmp_path_factory.mktemp("cache")
    config = NeuronConfig.model_validate(
        {
            "neuron": {
                "name": "cli-test",
                "cache_dir": str(cache),
                "admin_token": TOKEN,
                "allowed_paths": [str(tmp_path_factory.getbasetemp())],  # the tests' models
            }
        }
    )
    with serve(create_app(NeuronRuntime(config, catalogue=[]))) as url:
        yield url


def _models(url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    if token:
        env["CORTEX_ADMIN_TOKEN"] = token  # the flag's environment variable
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "models", "--endpoint", url, *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_load_list_unload(neuron: str, tmp_path: Path) -> None:
    tiny = make_tiny_llama(tmp_path / "tiny")
    loaded = _models(neuron, "load", "tiny", "--source", f"file:{tiny}")
    assert loaded.returncode == 0, loaded.stderr
    assert "loading tiny" in loaded.stdout and "tiny ready on cpu-0" in loaded.stdout
    listed = _models(neuron, "list")
    assert listed.returncode == 0 and "tiny" in listed.stdout and "ready" in listed.stdout
    unloaded = _models(neuron, "unload", "tiny")
    assert unloaded.returncode == 0 and "unloaded tiny" in unloaded.stdout
    assert "tiny " not in _models(neuron, "list").stdout


def test_errors_are_reported_not_raised(neuron: str) -> None:
    missing = _models(neuron, "load", "nothing-like-it")
    assert missing.returncode == 2 and "catalogue" in missing.stderr
    unauthorized = _models(neuron, "unload", "x", token=None)
    assert unauthorized.returncode == 2 and "Traceback" not in unauthorized.stderr
