"""A failed ad-hoc load (`cortex models load MODEL --source ...` at a neuron's endpoint: a source
no catalogue names) against a real `cortex neuron`: the command prints the neuron's reason in one
line, the neuron logs one line per failure and no traceback, also for a load nobody waits on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
from tiny_models import make_tiny_llama

CORTEX = (sys.executable, "-m", "cortex.cli")


@dataclass
class Neuron:
    url: str
    log: Path
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}


@pytest.fixture
def neuron(tmp_path: Path) -> Iterator[Neuron]:
    """A neuron with 1 MiB of memory, loading files from tmp_path only."""
    config = tmp_path / "neuron.toml"
    config.write_text(
        f"[neuron]\nname = 'n1'\ncache_dir = '{tmp_path / 'cache'}'\ncpu_memory = '1MiB'\n"
        f"allowed_paths = ['{tmp_path}']\n"
    )
    port, log = free_port(), tmp_path / "neuron.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*CORTEX, "neuron", "--config", str(config), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)  # polling a starting process's port, with a deadline
        yield Neuron(url, log, process)
    finally:
        process.kill()
        process.wait()


def load(neuron: Neuron, model: str, source: str) -> str:
    done = subprocess.run(
        [*CORTEX, "models", "load", model, "--source", source, "--endpoint", neuron.url],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done
    (line,) = done.stderr.strip().splitlines()
    return line


def test_a_failed_ad_hoc_load_says_why_and_the_neuron_logs_one_line(
    neuron: Neuron, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.gguf"
    line = load(neuron, "ghost", f"file:{missing}")
    assert line == (
        f"cortex: load of ghost failed: source 'file:{missing}': no model there, or the path is "
        "outside this neuron's allowed_paths"
    )
    tiny = make_tiny_llama(tmp_path / "tiny")
    line = load(neuron, "tiny", f"file:{tiny}")
    assert line.startswith("cortex: load of tiny failed: model 'tiny' needs ")
    assert line.endswith("MiB; cpu-0 has 1 MiB free"), line
    # A load nobody waits on fails alone: its failure must not end in an unretrieved task.
    body = {"model": "unwaited", "source": f"file:{missing}", "wait": False}
    assert httpx.post(f"{neuron.url}/models/load", json=body, timeout=30).status_code == 202
    deadline = time.monotonic() + 30
    while "load of unwaited failed" not in neuron.log.read_text():
        assert time.monotonic() < deadline, neuron.log.read_text()
        time.sleep(0.05)  # polling the neuron's log for the failure's line, with a deadline
    neuron.process.send_signal(signal.SIGINT)
    neuron.process.wait(timeout=60)
    log = neuron.log.read_text()
    assert "Traceback" not in log and "never retrieved" not in log, log
    for model in ("ghost", "tiny", "unwaited"):
        assert log.count(f"load of {model} failed") == 1, log
