"""Fleet control against a real `cortex up` (docs/fleet-control.md): a load through the admin API,
then `cortex models`, `cortex status` and `cortex chat` as a user types them, at the default
endpoint's place (CORTEX_ENDPOINT) and with the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from cortex_up import Up, unload_all

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gateway(shared_up: Up) -> str:
    """The session's `cortex up` (tests/conftest.py), with nothing loaded."""
    unload_all(shared_up.url)
    return shared_up.url


def cortex(gateway: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORTEX_ENDPOINT": gateway, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_load_through_the_admin_api_streams_progress_to_ready(gateway: str) -> None:
    with httpx.stream("POST", f"{gateway}/admin/models/{CHAT}/load", timeout=300) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1] == {"model": CHAT, "neuron": "local", "state": "ready", "progress": 1.0}
    assert all(line["state"] in ("loading", "ready") for line in lines)


def test_models_list_and_status_show_every_model(gateway: str) -> None:
    listed = cortex(gateway, "models", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines() if line.strip()}
    assert rows[CHAT][1:3] == ["ready", "local"]
    assert rows["all-minilm-l6-v2"][1:3] == ["not", "loaded"]  # never loaded, still listed

    status = cortex(gateway, "status")
    assert status.returncode == 0, status.stderr
    assert CHAT in status.stdout and "all-minilm-l6-v2" in status.stdout
    assert max(len(line) for line in status.stdout.splitlines()) <= 80


def test_unload_then_load_with_the_cli(gateway: str) -> None:
    unloaded = cortex(gateway, "models", "unload", CHAT)
    assert unloaded.returncode == 0 and "unloaded" in unloaded.stdout, unloaded.stderr
    loaded = cortex(gateway, "models", "load", CHAT)
    assert loaded.returncode == 0, loaded.stderr
    assert f"{CHAT} ready on local" in loaded.stdout
    typo = cortex(gateway, "models", "load", "smollm2-135m-instruc")
    assert typo.returncode == 2 and f"did you mean {CHAT}?" in typo.stderr
    assert "Traceback" not in typo.stderr


def test_chat_answers_from_piped_stdin_and_quits_on_bye(gateway: str) -> None:
    # Greedy: at the model's own temperature (0.2) an unlucky first token took it elsewhere.
    question = "What is the capital of France?\n/bye\nnever sent\n"
    chat = cortex(gateway, "chat", CHAT, "--temperature", "0", stdin=question)
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
