"""Claude Code against the real `cortex up`: its request shape through the official anthropic SDK,
eight of them at once, and the real CLI from npm running the README's line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from cortex_up import Up, unload_all

from cortex.core.completion_limit import CLAMPED_HEADER

CHAT = "smollm2-135m-instruct"
CONTEXT = 8192
# The CLI version this test was written against; the README's line is run with it.
CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
# What Claude Code sends beside its body (a 2.1 release: beta flags, version, its client name).
BETAS = (
    "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
)
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
CLAUDE_CODE_HEADERS = {"anthropic-beta": BETAS, "x-app": "cli", "user-agent": "claude-cli/2.1.197"}


@pytest.fixture(scope="module")
def gateway(shared_up: Up) -> str:
    """The session's `cortex up` (tests/conftest.py), with nothing loaded."""
    unload_all(shared_up.url)
    return shared_up.url


@pytest.fixture(scope="module")
def claude(gateway: str) -> anthropic.Anthropic:
    """A client of the model once loaded: a stream that waits for a cold load has sent its
    headers (keep-alives) before the neuron could report a clamp."""
    client = anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=300)
    client.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    return client


def claude_code_body(question: str) -> dict[str, Any]:
    """A first turn as Claude Code sends it: cached system blocks, tools (the last one cached),
    metadata.user_id, max_tokens 32000, streamed; its full prompt cut down to fit 8,192 tokens."""
    string = {"type": "string"}
    tools = [
        {
            "name": name,
            "description": description,
            "input_schema": {
                "type": "object",
                "properties": {arg: string for arg in args},
                "required": [args[0]],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        }
        for name, description, args in (
            ("Bash", "Executes a bash command in a persistent shell session.", ["command"]),
            ("Read", "Reads a file from the local filesystem.", ["file_path", "offset"]),
            ("Edit", "Performs exact string replacements in files.", ["file_path", "old_string"]),
            ("Grep", "A search tool built on ripgrep.", ["pattern", "path"]),
        )
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    return {
        "model": CHAT,
        "max_tokens": 32000,
        # Claude Code sends no temperature (nor can the SDK); greedy keeps these answers short.
        "extra_body": {"temperature": 0},
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "You are an interactive CLI tool that helps users with software "
                "engineering tasks. Answer in one short sentence.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": tools,
        "metadata": {"user_id": "user_0f3a_account__session_7d21"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "<system-reminder>Today is 2026-12-02.</system-reminder>",
                    },
                    {"type": "text", "text": question, "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
    }


def test_claude_code_request_streams_through_the_sdk(claude: anthropic.Anthropic) -> None:
    body = claude_code_body("What is the capital of France?")
    with claude.messages.stream(**body, extra_headers=CLAUDE_CODE_HEADERS) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert events[0].type == "message_start"  # first, with no ping before it
    assert final.content and final.stop_reason in ("end_turn", "tool_use", "max_tokens")
    # The prompt's size comes back in both events, the same, cached tokens apart in both.
    start, delta = events[0], next(e for e in events if e.type == "message_delta")
    assert start.message.usage.input_tokens == delta.usage.input_tokens  # type: ignore[union-attr]
    cached = start.message.usage.cache_read_input_tokens
    assert cached == delta.usage.cache_read_input_tokens  # type: ignore[union-attr]


def test_claude_codes_max_tokens_is_clamped_to_the_context_and_reported(
    claude: anthropic.Anthropic,
) -> None:
    """Answered whole, so the header is there however long the prefill takes (a stream whose
    first token comes after the gateway's keep-alives began has sent its headers already)."""
    body = claude_code_body("What is the capital of France?")
    raw = claude.messages.with_raw_response.create(**body, extra_headers=CLAUDE_CODE_HEADERS)
    message = raw.parse()
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert raw.headers[CLAMPED_HEADER] == f"32000->{CONTEXT - prompt}"
    assert message.content


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"max_tokens": 32000}),
        ("/v1/chat/completions", {}),
        ("/v1/responses", {}),
    ],
)
def test_a_prompt_alone_over_the_context_is_a_400_naming_the_numbers(
    gateway: str, path: str, body: dict[str, Any]
) -> None:
    text = "word " * 9000
    if path == "/v1/responses":
        body = {**body, "model": CHAT, "input": text}
    else:
        body = {**body, "model": CHAT, "messages": [{"role": "user", "content": text}]}
    answer = httpx.post(f"{gateway}{path}", json=body, headers=ANTHROPIC_HEADERS, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    if path == "/v1/messages":  # Anthropic's words, which Claude Code reads to offer /compact
        assert answer.json()["type"] == "error"
        assert re.fullmatch(r"prompt is too long: \d+ tokens > 8191 maximum", error["message"])
    else:
        assert "8192" in error["message"] and "your prompt has" in error["message"]
        assert error["code"] == "context_length_exceeded"


def test_eight_claude_code_streams_run_together(claude: anthropic.Anthropic) -> None:
    """Each stream notes when its first event came and when it stopped reading (after a few
    tokens): all eight were generating at once if every start precedes every stop."""
    starts: list[float] = []
    stops: list[float] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        body = claude_code_body(f"Question {i}: name a colour.")
        try:
            with claude.messages.stream(**body, extra_headers=CLAUDE_CODE_HEADERS) as stream:
                deltas = 0
                for event in stream:
                    if event.type == "message_start":
                        starts.append(time.monotonic())
                    deltas += event.type == "content_block_delta"
                    if deltas == 3 or event.type == "message_stop":
                        break
                stops.append(time.monotonic())
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert len(starts) == len(stops) == 8
    assert max(starts) < min(stops), "a stream ended before the last one began"


def _claude_code_cli(cache: Path) -> Path:
    """The CLI from npm, installed once under `cache` (kept between runs); skipped only when npm
    cannot reach its registry."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    prefix = cache / "claude-code" / CLAUDE_CODE.rsplit("@", 1)[1]
    binary = prefix / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary
    if subprocess.run([npm, "ping"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("npm cannot reach its registry")
    prefix.mkdir(parents=True, exist_ok=True)
    install = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", CLAUDE_CODE]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return binary


# What Claude Code says when an answer stopped at max_tokens (stop_reason "max_tokens").
RAMBLED = "output token maximum"


def test_the_readme_claude_code_line_works_with_the_real_cli(gateway: str, tmp_path: Path) -> None:
    tools = Path(os.environ.get("CORTEX_TEST_TOOLS", "~/.cache/cortex-tests")).expanduser()
    claude_cli = _claude_code_cli(tools)
    line = _readme_claude_code_line(gateway)
    env = {
        "PATH": f"{claude_cli.parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),  # no user settings, no login
        "DISABLE_AUTOUPDATER": "1",
    }
    done = subprocess.run(
        ["bash", "-c", line], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    if RAMBLED in done.stdout + done.stderr:
        # The 135M model sampled its way to max_tokens (Claude Code sends no temperature), and
        # Claude Code read the stop_reason right: the protocol worked. Once more; twice would be
        # a model that never stops, which is a failure.
        done = subprocess.run(
            ["bash", "-c", line], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip()
    assert httpx.get(f"{gateway}/health", timeout=5).json()["status"] == "ok"


def _readme_claude_code_line(gateway: str) -> str:
    """The README's Claude Code command, as a user copies it (pointed at this test's port)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- claude-code -->", 2)[1]
    command = block.split("```sh", 1)[1].split("```", 1)[0]
    return command.replace("\\\n", " ").replace("http://127.0.0.1:31313", gateway)
