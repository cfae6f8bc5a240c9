"""Tool calls in model output: Hermes/Qwen `<tool_call>` blocks and bare JSON, parsed whole or streamed.

One incremental parser (ToolCallStream) serves both paths, so a streamed answer and a non-streamed
one are split into content and tool calls the same way. Anything that does not parse stays text.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FENCE = "```"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedToolCall:
    """One call the model made; `arguments` is a JSON object as text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    """Model output split into the text meant for the user and the tool calls."""

    content: str | None
    tool_calls: list[ParsedToolCall]


ToolStreamEvent = str | ParsedToolCall


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(item: Any, *, bare: bool) -> ParsedToolCall | None:
    """A decoded JSON value as a call, or None. Bare JSON must name its arguments explicitly."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # OpenAI-shaped {"type": "function", "function": {}}
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return None
    key = "arguments" if "arguments" in item else "parameters"
    if bare and key not in item:
        return None
    args = item.get(key, {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(new_call_id(), name, _arguments_text(args))


def _arguments_text(args: dict[str, Any]) -> str:
    """Decoded arguments as JSON text any client parses; non-ASCII stays readable if it can."""
    try:
        text = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except ValueError:  # an infinite or NaN number: rare, so the copy is made only then
        return _arguments_text(_finite(args))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud83d" decoded) travels only escaped
        return json.dumps(args, allow_nan=False)
    return text


def _finite(value: Any) -> Any:
    """`value` with numbers JSON can write: 1e400 decodes to inf, which has no JSON form, so it
    becomes the largest double (still a number for the tool's schema); NaN becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(sys.float_info.max, value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _as_calls(value: Any, *, bare: bool) -> list[ParsedToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, bare=bare) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _strip_fence(text: str) -> str:
    """```json\\n{...}\\n``` -> {...}; text without a fence is returned stripped."""
    text = text.strip()
    if text.startswith(_FENCE):
        text = text[len(_FENCE) :]
        text = text.removeprefix("json")
        text = text.strip()
        text = text.removesuffix(_FENCE).rstrip()
    return text


def decode_block(body: str) -> list[ParsedToolCall] | None:
    """The calls inside one `<tool_call>` block, or None if it does not hold valid call JSON."""
    text = _strip_fence(body)
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    # Small models often close one brace too many; anything else after the JSON is not a call.
    if text[end:].strip().strip("}"):
        return None
    return _as_calls(value, bare=False)


def parse_bare(text: str, tool_names: set[str] | None = None) -> ParsedOutput | None:
    """Output that starts with call JSON (optionally fenced, one or several values); None otherwise."""
    rest = text.strip()
    fenced = rest.startswith(_FENCE)
    if fenced:
        rest = rest[len(_FENCE) :].removeprefix("json").lstrip()
    calls: list[ParsedToolCall] = []
    while rest[:1] in ("{", "["):
        try:
            value, end = _DECODER.raw_decode(rest)
        except ValueError:
            break
        found = _as_calls(value, bare=True)
        if found is None:
            break
        calls.extend(found)
        rest = rest[end:].lstrip()
    if not calls:
        return None
    if tool_names is not None and any(call.name not in tool_names for call in calls):
        return None
    if fenced:
        rest = rest.removeprefix(_FENCE)
    return ParsedOutput(content=rest.strip() or None, tool_calls=calls)


def _open_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that could be the start of `<tool_call>`."""
    for size in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def _leading_kind(held: str) -> Literal["undecided", "bare", "text"]:
    """Whether output that begins with `held` may be bare call JSON (then it is held to the end)."""
    rest = held.lstrip()
    if not rest:
        return "undecided"
    if rest.startswith(_FENCE):
        rest = rest[len(_FENCE) :]
        if "json".startswith(rest):
            return "undecided"
        rest = rest.removeprefix("json").lstrip()
        if not rest:
            return "undecided"
    elif _FENCE.startswith(rest):
        return "undecided"
    if rest.startswith("{"):
        return "bare"
    if rest.startswith("["):
        inner = rest[1:].lstrip()
        if not inner:
            return "undecided"
        return "bare" if inner.startswith("{") else "text"
    return "text"


class ToolCallStream:
    """Incremental split of model output into text and tool calls.

    feed() returns what is safe to send now; text that may be the start of a call is held until
    it is known. close() flushes the rest. Whitespace next to calls is dropped, as in parse().
    """

    def __init__(self, tool_names: set[str] | None = None) -> None:
        self._tool_names = tool_names
        self._mode: Literal["start", "bare", "text", "block"] = "start"
        self._held = ""
        self._whitespace = ""
        self.calls = 0

    def feed(self, text: str) -> list[ToolStreamEvent]:
        self._held += text
        out: list[ToolStreamEvent] = []
        if self._mode == "start":
            kind = _leading_kind(self._held)
            if kind == "undecided":
                return out
            self._mode = kind
        if self._mode in ("text", "block"):
            self._scan(out)
        return out

    def close(self) -> list[ToolStreamEvent]:
        out: list[ToolStreamEvent] = []
        if self._mode in ("start", "bare"):
            parsed = parse_bare(self._held, self._tool_names)
            if parsed is not None:
                self._held = ""
                self._text(out, parsed.content or "")
                for call in parsed.tool_calls:
                    self._call(out, call)
            self._mode = "text"
            self._scan(out)
        if self._mode == "block":  # truncated block: a call if its JSON is complete
            calls = self._offered(decode_block(self._held[len(OPEN) :]))
            for call in calls or []:
                self._call(out, call)
            if calls:
                self._held = ""
        self._text(out, self._held)
        self._held = ""
        if not self.calls and self._whitespace:
            out.append(self._whitespace)
        self._whitespace = ""
        return out

    def _scan(self, out: list[ToolStreamEvent]) -> None:
        while True:
            if self._mode == "text":
                start = self._held.find(OPEN)
                if start < 0:
                    keep = _open_prefix_len(self._held)
                    self._text(out, self._held[: len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep :]
                    return
                self._text(out, self._held[:start])
                self._held = self._held[start:]
                self._mode = "block"
            end = self._held.find(CLOSE)
            if end < 0:
                return
            block, self._held = self._held[: end + len(CLOSE)], self._held[end + len(CLOSE) :]
            calls = self._offered(decode_block(block[len(OPEN) : end]))
            if calls is None:
                self._text(out, block)
            for call in calls or []:
                self._call(out, call)
            self._mode = "text"

    def _offered(self, calls: list[ParsedToolCall] | None) -> list[ParsedToolCall] | None:
        """A block's calls if every one names a tool the request offered; else None, and the
        block stays text: a client never gets a call to a tool it does not have."""
        if calls is None or self._tool_names is None:
            return calls
        return calls if all(call.name in self._tool_names for call in calls) else None

    def _text(self, out: list[ToolStreamEvent], text: str) -> None:
        if not text:
            return
        if not text.strip():
            self._whitespace += text
            return
        out.append(self._whitespace + text)
        self._whitespace = ""

    def _call(self, out: list[ToolStreamEvent], call: ParsedToolCall) -> None:
        self._whitespace = ""
        self.calls += 1
        out.append(call)


_NAMED, _ARGUMENTS = '{"name": ', ', "arguments": '


def forced_calls(text: str, tool_names: set[str]) -> list[ParsedToolCall]:
    """The calls of a forced answer (constraints.tool_call_grammar's blocks), which the token
    limit may have cut anywhere. Complete calls read as parse_tool_calls reads them; a cut one
    keeps its name (the one of `tool_names` its start can still be) and the arguments text it
    got, valid JSON or not, as OpenAI returns a call cut by `length`."""
    calls: list[ParsedToolCall] = []
    for block in text.split(OPEN)[1:]:
        body = block.split(CLOSE)[0].removeprefix("\n")
        rest = body.removeprefix("[")
        while True:
            call, rest = _cut_call(rest, tool_names)
            if call is None:
                break
            calls.append(call)
            if not rest.startswith(", "):
                break
            rest = rest[2:]
    return calls


def _cut_call(text: str, tool_names: set[str]) -> tuple[ParsedToolCall | None, str]:
    """The call `text` opens (`{"name": ..., "arguments": ...}`, possibly cut) and what follows."""
    if not _NAMED.startswith(text[: len(_NAMED)]):
        return None, text
    after = text[len(_NAMED) :]
    try:
        name, end = _DECODER.raw_decode(after)
    except ValueError:  # cut inside the name: the one forced tool it may still be
        start = after[1:]
        named = [n for n in tool_names if n.startswith(start)]
        return (ParsedToolCall(new_call_id(), named[0], "") if len(named) == 1 else None), ""
    if name not in tool_names:
        return None, text
    rest = after[end:]
    if not rest.startswith(_ARGUMENTS):
        return ParsedToolCall(new_call_id(), name, ""), ""
    arguments = rest[len(_ARGUMENTS) :]
    try:
        value, end = _DECODER.raw_decode(arguments)
    except ValueError:
        return ParsedToolCall(new_call_id(), name, arguments), ""
    if not isinstance(value, dict):
        return None, text
    return ParsedToolCall(new_call_id(), name, _arguments_text(value)), arguments[
        end:
    ].removeprefix("}")


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> ParsedOutput:
    """Split complete model output into content and tool calls (content None if only calls)."""
    stream = ToolCallStream(tool_names)
    events = stream.feed(text) + stream.close()
    calls = [event for event in events if isinstance(event, ParsedToolCall)]
    if not calls:
        return ParsedOutput(content=text, tool_calls=[])
    content = "".join(event for event in events if isinstance(event, str)).strip()
    return ParsedOutput(content=content or None, tool_calls=calls)
