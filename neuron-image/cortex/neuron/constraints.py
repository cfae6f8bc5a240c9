"""What an OpenAI request asks the output to be, as a grammar: pure, request in, GrammarSpec out.

`response_format` json_object / json_schema constrain the whole output to JSON. A forced
`tool_choice` ("required" or a named function) constrains it to one `<tool_call>` block, the form
tools.py parses, whose JSON is `{"name": ..., "arguments": ...}` with that tool's parameter schema
as the arguments' own root; for "required", an array of those unless `parallel_tool_calls` is
false. A forced tool call wins over `response_format`. With tools offered but not forced, the
output is either such a block or the `response_format` JSON: an agent asks for both (tools to
call, then a typed final answer).
"""

from __future__ import annotations

import json
from typing import Any

from cortex.core.errors import InvalidRequest
from cortex.neuron.grammar import JSON_STYLE, GrammarSpec
from cortex.neuron.tools import CLOSE, OPEN

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def response_format_grammar(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """The grammar of `response_format`; None for plain text."""
    schema = response_format_schema(response_format)
    return GrammarSpec.json_schema(schema) if schema is not None else None


def response_format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the output to follow; None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _ANY_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            schema = _ANY_OBJECT  # OpenAI allows a name without a schema: any JSON object
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
            )
        return schema
    raise InvalidRequest(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
        param="response_format.type",
    )


def forced_tools(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """The tools one of which must be called (OpenAI shape), or None when calling is optional."""
    if tool_choice == "required":
        if not tools:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        return tools
    if not isinstance(tool_choice, dict):
        return None
    name = (tool_choice.get("function") or {}).get("name")
    named = [t for t in tools or [] if t["function"]["name"] == name]
    if not named:
        raise InvalidRequest(
            f"tool_choice names {name!r}, which is not among the request's tools",
            param="tool_choice",
        )
    return named


def tool_call_grammar(
    tools: list[dict[str, Any]], parallel: bool, answer: dict[str, Any] | None = None
) -> GrammarSpec:
    """One `<tool_call>` block calling one of `tools` with schema-valid arguments; when parallel,
    the block may hold a JSON array of such calls instead (vLLM's "required" shape). With an
    `answer` schema, that JSON is allowed instead of the block.

    One block, not a run of them: a small model that may open another block after each one
    keeps opening them until its token limit. Each tool's arguments are their own `%json` rule,
    so the parameter schema is a root: its `$ref`s (`#/$defs/...`, `#`) resolve against it."""
    head, tail = json.dumps(OPEN + "\n"), json.dumps("\n" + CLOSE)
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    lines = [
        f"start: {head} calls {tail}" + (" | answer" if answer is not None else ""),
        'calls: call | "[" call (", " call)* "]"' if parallel else "calls: call",
        f"call: {calls}",
    ]
    for i, tool in enumerate(tools):
        function = tool["function"]
        # The JSON style's separators, name first: the object tools.py parses.
        named = '{"name": ' + json.dumps(function["name"]) + ', "arguments": '
        lines.append(f'call_{i}: {json.dumps(named)} args_{i} "}}"')
        lines.append(f"args_{i}: %json {_styled(_arguments_schema(function))}")
    if answer is not None:
        lines.append(f"answer: %json {_styled(answer)}")
    return GrammarSpec("lark", "\n".join(lines))


def _styled(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}})


def chat_constraint(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    response_format: dict[str, Any] | None,
) -> tuple[GrammarSpec, str] | None:
    """The grammar a chat request's output must follow and its kind (for metrics); None if free."""
    forced = forced_tools(tools, tool_choice) if tool_choice != "none" else None
    if forced is not None:
        # A named function is one call, as vLLM makes it: a list of calls to the same function
        # has no end a small model finds before its token limit.
        parallel = tool_choice == "required" and parallel_tool_calls is not False
        return tool_call_grammar(forced, parallel), "tool_call"
    answer = response_format_schema(response_format)
    if answer is None:
        return None
    kind = str((response_format or {}).get("type"))
    if tools and tool_choice != "none":  # a call, or the answer in its format
        return tool_call_grammar(tools, parallel_tool_calls is not False, answer), kind
    return GrammarSpec.json_schema(answer), kind


_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The tool's parameter schema, held to an object (tools.py drops a call whose arguments are
    anything else); omitted, the tool takes no arguments (as OpenAI reads it)."""
    parameters = function.get("parameters") or _NO_ARGUMENTS
    kind = parameters.get("type")
    if kind == "object":
        return parameters
    if kind is None or (isinstance(kind, list) and "object" in kind):
        # At the root, beside the rest, so its `$ref`s still resolve against it.
        return {**parameters, "type": "object"}
    raise InvalidRequest(
        f"tool {function['name']!r}: parameters must be a JSON schema of an object, not {kind!r}",
        param="tools",
    )
