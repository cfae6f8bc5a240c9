"""The tool-call parser on realistic model output, whole and streamed in every chunking."""

from __future__ import annotations

import json

import pytest

from cortex.neuron.tools import ParsedOutput, ParsedToolCall, ToolCallStream, parse_tool_calls

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
NESTED = (
    '{"name": "create_event", "arguments": {"title": "Standup {daily}", '
    '"attendees": [{"email": "a@x.io", "tags": ["eng", "}"]}], "meta": {"room": {"floor": 3}}}}'
)


def _args(call: ParsedToolCall) -> dict[str, object]:
    value = json.loads(call.arguments)
    assert isinstance(value, dict)
    return value


def _stream(
    text: str, size: int, names: set[str] | None = None
) -> tuple[str, list[ParsedToolCall]]:
    stream = ToolCallStream(names)
    events = []
    for i in range(0, len(text), size):
        events += stream.feed(text[i : i + size])
    events += stream.close()
    calls = [e for e in events if isinstance(e, ParsedToolCall)]
    return "".join(e for e in events if isinstance(e, str)), calls


def test_hermes_block_becomes_a_call_with_json_string_arguments() -> None:
    parsed = parse_tool_calls(f"<tool_call>\n{WEATHER}\n</tool_call>")
    assert parsed.content is None
    [call] = parsed.tool_calls
    assert call.name == "get_weather"
    assert _args(call) == {"city": "Paris", "unit": "celsius"}
    assert call.id.startswith("call_") and len(call.id) > 10


def test_several_blocks_with_text_around_them() -> None:
    text = (
        "I'll check both cities.\n<tool_call>\n"
        + WEATHER
        + "\n</tool_call>\n<tool_call>\n"
        + WEATHER.replace("Paris", "Oslo")
        + "\n</tool_call>"
    )
    parsed = parse_tool_calls(text)
    assert parsed.content == "I'll check both cities."
    assert [_args(c)["city"] for c in parsed.tool_calls] == ["Paris", "Oslo"]
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_nested_json_with_braces_inside_strings() -> None:
    [call] = parse_tool_calls(f"<tool_call>{NESTED}</tool_call>").tool_calls
    args = _args(call)
    assert args["title"] == "Standup {daily}"
    assert args["meta"] == {"room": {"floor": 3}}


def test_parameters_key_and_string_arguments_are_accepted() -> None:
    text = (
        '<tool_call>{"name": "a", "parameters": {"x": 1}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
    )
    calls = parse_tool_calls(text).tool_calls
    assert [(c.name, _args(c)) for c in calls] == [("a", {"x": 1}), ("b", {"y": 2})]


def test_code_fence_inside_block() -> None:
    [call] = parse_tool_calls(f"<tool_call>\n```json\n{WEATHER}\n```\n</tool_call>").tool_calls
    assert call.name == "get_weather"


def test_trailing_junk_after_blocks_stays_content() -> None:
    parsed = parse_tool_calls(f"<tool_call>{WEATHER}</tool_call>\nLet me know if you need more.")
    assert parsed.content == "Let me know if you need more."
    assert len(parsed.tool_calls) == 1


def test_extra_closing_brace_from_small_models_is_tolerated() -> None:
    [call] = parse_tool_calls(f"<tool_call>{WEATHER}}}</tool_call>").tool_calls
    assert call.name == "get_weather"


def test_malformed_block_is_kept_as_text() -> None:
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call> done'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.content == text


def test_block_without_a_name_is_text() -> None:
    text = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse_tool_calls(text) == ParsedOutput(content=text, tool_calls=[])


def test_truncated_block_with_complete_json_is_a_call() -> None:
    [call] = parse_tool_calls(f"<tool_call>\n{WEATHER}\n").tool_calls
    assert call.name == "get_weather"


def test_truncated_block_with_cut_json_is_text() -> None:
    text = 'Checking. <tool_call>\n{"name": "get_weather", "argu'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.content == text


def test_bare_json_call() -> None:
    parsed = parse_tool_calls("  " + WEATHER + "\n")
    assert parsed.content is None
    assert parsed.tool_calls[0].name == "get_weather"


def test_bare_json_list_and_fenced_json() -> None:
    listed = parse_tool_calls(f"[{WEATHER}, {NESTED}]")
    assert [c.name for c in listed.tool_calls] == ["get_weather", "create_event"]
    fenced = parse_tool_calls(f"```json\n{WEATHER}\n```\nDone.")
    assert [c.name for c in fenced.tool_calls] == ["get_weather"]
    assert fenced.content == "Done."


def test_bare_json_that_is_not_a_call_is_content() -> None:
    for text in ('{"name": "Alice", "age": 30}', '{"city": "Paris"}', "[1, 2, 3]"):
        assert parse_tool_calls(text).tool_calls == []
        assert parse_tool_calls(text).content == text


def test_bare_json_naming_an_unknown_tool_is_content_when_tools_are_known() -> None:
    assert parse_tool_calls(WEATHER, {"get_weather"}).tool_calls
    assert parse_tool_calls(WEATHER, {"search"}).tool_calls == []


def test_a_block_naming_a_tool_not_offered_stays_text() -> None:
    """A small model may call a tool it was never given: the client gets the text, never a call
    it cannot run (the Agents SDK fails the whole run on an unknown tool)."""
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(text, {"get_weather"}).tool_calls == []
    assert parse_tool_calls(text, {"get_weather"}).content == text
    assert [c.name for c in parse_tool_calls(text, {"rm_rf"}).tool_calls] == ["rm_rf"]
    mixed = '<tool_call>\n[{"name": "get_weather", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]\n</tool_call>'
    assert parse_tool_calls(mixed, {"get_weather"}).tool_calls == []


def test_json_in_the_middle_of_prose_is_not_a_call() -> None:
    text = f"Here is an example call: {WEATHER} - that is the format."
    assert parse_tool_calls(text).tool_calls == []


def test_plain_text_is_untouched() -> None:
    text = "  Use `x < y` and <b>bold</b>; a <tool_ tag that never completes.\n\n"
    assert parse_tool_calls(text).content == text


TEXTS = [
    "Plain answer with <b>html</b> and a lone <tool",
    f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{NESTED}</tool_call>",
    f"<tool_call>{WEATHER}</tool_call> trailing words",
    f"```json\n{WEATHER}\n```",
    f"[{WEATHER}]",
    'x <tool_call>{"name": broken}</tool_call> y',
    f"<tool_call>\n{WEATHER}",
    "```python\nprint('hi')\n```",
    "[link](http://example.com) text",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streaming_splits_like_the_whole_parse(text: str, size: int) -> None:
    whole = parse_tool_calls(text)
    content, calls = _stream(text, size)
    assert [(c.name, c.arguments) for c in calls] == [
        (c.name, c.arguments) for c in whole.tool_calls
    ]
    if whole.tool_calls:
        assert content.strip() == (whole.content or "")
    else:
        assert content == text


def test_streaming_sends_plain_text_before_the_end() -> None:
    stream = ToolCallStream({"get_weather"})
    assert stream.feed("Hello") == ["Hello"]
    assert stream.feed(" world <tool") == [" world "]  # "<tool" may open a block: held
    assert stream.feed("box>") == ["<toolbox>"]


def test_streaming_holds_a_block_until_it_closes() -> None:
    stream = ToolCallStream({"get_weather"})
    assert stream.feed("<tool_call>\n" + WEATHER[:20]) == []
    [call] = stream.feed(WEATHER[20:] + "\n</tool_call>")
    assert isinstance(call, ParsedToolCall)
    assert stream.close() == []


def test_streaming_holds_leading_json_to_the_end() -> None:
    stream = ToolCallStream({"get_weather"})
    assert stream.feed(WEATHER) == []
    [call] = stream.close()
    assert isinstance(call, ParsedToolCall)
    assert stream.calls == 1


def test_arguments_are_always_valid_json_text() -> None:
    """1e400 decodes to inf and an escaped lone surrogate to a character UTF-8 cannot hold:
    the arguments the client gets are still JSON, parsed without loss of readable text."""
    block = '<tool_call>\n{"name": "f", "arguments": ARGS}\n</tool_call>'
    args = '{"x": 1e400, "y": -1e400, "z": NaN, "city": "Zürich"}'
    (call,) = parse_tool_calls(block.replace("ARGS", args), {"f"}).tool_calls
    assert "Zürich" in call.arguments
    assert json.loads(call.arguments, parse_constant=pytest.fail) == {
        "x": 1.7976931348623157e308,
        "y": -1.7976931348623157e308,
        "z": None,
        "city": "Zürich",
    }
    lone = block.replace("ARGS", '{"s": "\\ud83d", "city": "Zürich"}')
    (call,) = parse_tool_calls(lone, {"f"}).tool_calls
    call.arguments.encode("utf-8")
    assert json.loads(call.arguments) == {"s": "\ud83d", "city": "Zürich"}
