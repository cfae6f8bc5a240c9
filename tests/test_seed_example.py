"""A seed user's files run unchanged: `cortex up --config examples/seed/cortex.toml`, started as a
user starts it. It also shows what a user sees on start and in production logs: the banner,
`Started server process` once, JSON lines with request ids, and no lines from internal polls."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed" / "cortex.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(http: httpx.Client, path: str, ok: object, timeout: float = 180) -> httpx.Response:
    """GET `path` until `ok(response)` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = http.get(path)
            if ok(response):  # type: ignore[operator]
                return response
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{path} not ready in time"
        time.sleep(0.2)  # polling a starting server, with a deadline


def test_the_seed_example_runs(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["HOME"] = str(tmp_path)  # the neuron's caches stay in this test
    argv = [sys.executable, "-m", "cortex.cli", "--log-format", "json", "up"]
    argv += ["--config", str(SEED), "--port", str(port), "--metrics-port", str(metrics)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            listing = wait_for(http, "/v1/models", lambda r: r.status_code == 200).json()
            cards = {card["id"]: card for card in listing["data"]}
            assert "small" in cards["smollm2-135m-instruct"]["aliases"]
            assert "embed" in cards["all-minilm-l6-v2"]["aliases"]
            # The local neuron has been polled (and found healthy) before we look at the log.
            wait_for(http, "/fleet", lambda r: any(n["healthy"] for n in r.json()["neurons"]))
            # Refused by the gateway itself, before anything loads (a max_tokens over the
            # seed's limit.output is clamped by the neuron now: tests/gateway/test_day_one_gateway.py).
            bad = {
                "model": "small",
                "max_tokens": 0,
                "messages": [{"role": "user", "content": "hi"}],
            }
            refused = http.post(
                "/v1/chat/completions", json=bad, headers={"x-request-id": "seed-1"}
            )
            assert refused.status_code == 400 and "max_tokens" in refused.text
            assert refused.headers["x-request-id"] == "seed-1"
            typo = http.post("/v1/chat/completions", json={**bad, "model": "smol", "max_tokens": 8})
            assert typo.status_code == 404
            assert "did you mean smollm2-135m-instruct?" in typo.text
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert not out.strip()  # under --log-format json the banner is a log record
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    (ready,) = [r for r in records if r["message"] == "cortex gateway ready"]
    assert ready["api"] == f"http://127.0.0.1:{port}/v1"
    assert ready["web_page"] == f"http://127.0.0.1:{port}/"
    assert ready["metrics"] == f"http://127.0.0.1:{metrics}/metrics"
    assert ready["config"] == str(SEED)
    assert {"id": "smollm2-135m-instruct", "kind": "chat"} in ready["models"]
    messages = [r["message"] for r in records]
    assert sum("Started server process" in m for m in messages) == 1
    assert sum("Finished server process" in m for m in messages) == 1
    polls = [m for m in messages if '"GET /status ' in m]
    assert polls == []
    refused_line = [r for r in records if "POST /v1/chat/completions" in r["message"]]
    assert any(r["request_id"] == "seed-1" and '" 400' in r["message"] for r in refused_line)
