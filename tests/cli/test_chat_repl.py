"""`cortex chat` as a user drives it, in a subprocess, against a small real HTTP server that plays a
gateway's OpenAI API from a script: a failed answer costs one line on stderr and its question,
never the conversation; Ctrl-C stops an answer and, at the prompt, quits; so does Ctrl-D."""

from __future__ import annotations

import http.server
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

Message = dict[str, str]


@dataclass
class Script:
    """What each POST /v1/chat/completions gets, in order, and the messages each one carried."""

    answers: list[str]
    asked: list[list[Message]] = field(default_factory=list)
    streaming: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def handler_for(script: Script) -> type[http.server.BaseHTTPRequestHandler]:
    class Gateway(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            script.asked.append(body["messages"])
            kind, _, text = script.answers.pop(0).partition(":")
            if kind == "error":
                error = {"message": text, "type": "server_error", "code": "generation_failed"}
                self._json(500, {"error": error})
            elif kind == "drop":  # the connection closes before any answer
                self.close_connection = True
            else:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                self._chunk(text)
                if kind == "hang":  # the answer stops half way, until the test is done
                    script.streaming.set()
                    script.release.wait(60)
                    return
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        def _chunk(self, text: str) -> None:
            chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Gateway


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[tuple[str, Script]]:
    script = Script(answers=list(request.param))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(script))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        script.release.set()
        server.shutdown()
        server.server_close()


def chat_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}


@pytest.mark.parametrize(
    "gateway", [["error:the model broke", "drop", "answer:Hi there", "answer:ok"]], indirect=True
)
def test_a_failed_answer_is_one_line_and_the_conversation_goes_on(
    gateway: tuple[str, Script],
) -> None:
    url, script = gateway
    done = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "chat", "m", "--endpoint", url],
        input="one\ntwo\nthree\nfour\n", capture_output=True, text=True, timeout=60, env=chat_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "cortex: the model broke",
        f"cortex: {url}: server disconnected without sending a response.",
    ]
    assert done.stdout.split() == ["Hi", "there", "ok"]
    # The failed questions were not kept: the user asks again, the answered one stays.
    assert script.asked == [
        [{"role": "user", "content": "one"}],
        [{"role": "user", "content": "two"}],
        [{"role": "user", "content": "three"}],
        [
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "four"},
        ],
    ]


class Terminal:
    """`cortex chat` on a pseudo-terminal, as a user at a shell runs it."""

    def __init__(self, url: str) -> None:
        self.master, follower = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "chat", "m", "--endpoint", url],
            stdin=follower, stdout=follower, stderr=follower, env=chat_env(),
        )  # fmt: skip
        os.close(follower)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """What the terminal shows up to and including `text` (what follows is kept)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {text!r} in {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process ended: its terminal is gone
                    assert text in self.seen, f"never saw {text!r} in {self.seen!r}"
        shown, _, self.seen = self.seen.partition(text)
        return shown + text

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def exit_code(self) -> int:
        try:
            return self.process.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.mark.parametrize("gateway", [["hang:Once upon", "answer:fine"]], indirect=True)
def test_ctrl_c_stops_an_answer_and_at_the_prompt_quits(gateway: tuple[str, Script]) -> None:
    url, script = gateway
    term = Terminal(url)
    term.read_until(">>> ")
    term.type("tell me a story\n")
    term.read_until("Once upon")
    assert script.streaming.is_set()
    term.process.send_signal(signal.SIGINT)  # what Ctrl-C sends the terminal's foreground
    shown = term.read_until(">>> ")  # back at the prompt, the process alive
    assert "Traceback" not in shown and term.process.poll() is None
    term.type("again\n")
    assert "fine" in term.read_until(">>> ")
    # The stopped answer's question was not kept.
    assert script.asked[1] == [{"role": "user", "content": "again"}]
    term.process.send_signal(signal.SIGINT)
    assert term.exit_code() == 0
    assert "Traceback" not in term.seen


@pytest.mark.parametrize("gateway", [[]], indirect=True)
def test_ctrl_d_at_the_prompt_quits(gateway: tuple[str, Script]) -> None:
    url, _ = gateway
    term = Terminal(url)
    term.read_until(">>> ")
    term.type("\x04")  # Ctrl-D: end of input
    assert term.exit_code() == 0
    assert "Traceback" not in term.seen
