"""A wrong --endpoint, for every command that takes one, as a user meets it: a closed port, a web
server that is not cortex, a URL that is no URL. Each is one accurate line and exit 2."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

# Each command, and what it asks a server that is not cortex first and last: the gateway's
# /fleet, then a neuron's /status, where a neuron's endpoint serves too.
COMMANDS = {
    "status": ("status",),
    "models list": ("models", "list"),
    "models load": ("models", "load", "m"),
    "keys": ("keys",),
    "neurons cordon": ("neurons", "cordon", "n1"),
    "chat": ("chat", "m"),
}
NOT_CORTEX = {
    "status": "answered 404 for /status: is it a cortex gateway or neuron?",
    "models list": "answered 404 for /status: is it a cortex gateway or neuron?",
    "models load": "answered 404 for /status: is it a cortex gateway or neuron?",
    "keys": "answered 404 for /fleet: is it a cortex gateway?",
    "neurons cordon": "answered 404 for /fleet: is it a cortex gateway?",
    "chat": "answered 404 for /v1/models: is it a cortex gateway?",
}


class NotFound(http.server.BaseHTTPRequestHandler):
    """A web server with none of cortex's paths: an HTML 404 for everything."""

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body><h1>Not Found</h1></body></html>")

    do_GET = do_POST = _not_found

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def web_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def closed_port() -> Iterator[str]:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def one_line(command: str, endpoint: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    done = subprocess.run(
        [sys.executable, "-m", "cortex.cli", *COMMANDS[command], "--endpoint", endpoint],
        input="hello\n", capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and not done.stdout.strip(), done
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_port(command: str, closed_port: str) -> None:
    assert (
        one_line(command, closed_port)
        == f"cortex: cannot connect to {closed_port}: connection refused"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_web_server_that_is_not_cortex(command: str, web_server: str) -> None:
    assert one_line(command, web_server) == f"cortex: {web_server} {NOT_CORTEX[command]}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:31313", "it needs http:// or https:// (http://localhost:31313?)"),
        ("ftp://127.0.0.1:31313", "it needs http:// or https://"),
        ("http://", "no host"),
        ("http://exa mple:31313", "'exa%20mple' is no host name"),
        ("http://127.0.0.1:313131", "port 313131 is out of range"),
    ],
)
def test_a_malformed_url(command: str, url: str, why: str) -> None:
    assert one_line(command, url) == f"cortex: invalid URL {url!r}: {why}"
