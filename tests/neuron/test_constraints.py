"""Requests to grammars (constraints.py) and grammars to token masks (grammar.py), on the default
model's real tokenizer; the model itself is exercised in tests/test_structured_real.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from cortex.core.errors import InvalidRequest
from cortex.neuron.constraints import chat_constraint
from cortex.neuron.grammar import GrammarCompiler, GrammarError, GrammarSpec, apply_bitmask

VOCAB = 49152
EOS = 2  # <|im_end|>
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    """The tokenizer the neuron serves SmolLM2 with (conftest.py)."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB, "smollm2-test")


def _allowed(compiler: GrammarCompiler, tokenizer: Any, spec: GrammarSpec, text: str) -> bool:
    """Whether the grammar lets the tokens of `text` through and then ends (EOS or complete)."""
    matcher = compiler.compile(spec)[0].matcher()
    for token in tokenizer.encode(text, add_special_tokens=False):
        logits = torch.zeros(2, VOCAB)
        apply_bitmask(logits, [None, matcher])
        assert torch.equal(logits[0], torch.zeros(VOCAB)), "a free row was touched"
        if logits[1, token] != 0 or matcher.advance(token) is not None:
            return False
    if matcher.done:
        return True
    logits = torch.zeros(1, VOCAB)
    apply_bitmask(logits, [matcher])
    return bool(logits[0, EOS] == 0)


def test_requests_map_to_grammars() -> None:
    assert chat_constraint(TOOLS, "auto", None, None) is None
    assert chat_constraint(TOOLS, "none", None, {"type": "text"}) is None
    assert chat_constraint(None, None, None, {"type": "json_object"})[1] == "json_object"  # type: ignore[index]
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
    assert chat_constraint(TOOLS, "auto", None, fmt)[1] == "json_schema"  # type: ignore[index]
    assert chat_constraint(TOOLS, "required", None, fmt)[1] == "tool_call"  # type: ignore[index]
    for tools, choice, param in (
        (None, "required", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            chat_constraint(tools, choice, None, None)
        assert refused.value.param == param
    with pytest.raises(InvalidRequest):
        chat_constraint(None, None, None, {"type": "yaml"})


def test_a_named_tool_call_is_the_only_output_allowed(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    spec, _ = chat_constraint(TOOLS, named, False, None)  # type: ignore[misc]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _allowed(compiler, tokenizer, spec, call)
    assert not _allowed(compiler, tokenizer, spec, call.replace("get_weather", "get_time"))
    assert not _allowed(compiler, tokenizer, spec, call.replace('"city"', '"town"'))
    assert not _allowed(compiler, tokenizer, spec, f"{call}\n{call}")  # parallel_tool_calls false
    # Parallel calls allowed or not, a named function is one call, never a list of them.
    spec, _ = chat_constraint(TOOLS, named, None, None)  # type: ignore[misc]
    assert _allowed(compiler, tokenizer, spec, call)
    inner = call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    assert not _allowed(compiler, tokenizer, spec, f"<tool_call>\n[{inner}]\n</tool_call>")
    assert not _allowed(compiler, tokenizer, spec, "def get_weather(city):")


def test_required_allows_any_tool_and_parallel_calls_as_one_array(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    spec, _ = chat_constraint(TOOLS, "required", None, None)  # type: ignore[misc]
    weather = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    time_ = '{"name": "get_time", "arguments": {}}'
    assert _allowed(compiler, tokenizer, spec, f"<tool_call>\n{weather}\n</tool_call>")
    # Parallel calls are one block holding an array: a run of blocks never ends on a small model.
    both = f"<tool_call>\n[{weather}, {time_}]\n</tool_call>"
    assert _allowed(compiler, tokenizer, spec, both)
    two_blocks = f"<tool_call>\n{weather}\n</tool_call>\n<tool_call>\n{time_}\n</tool_call>"
    assert not _allowed(compiler, tokenizer, spec, two_blocks)
    assert not _allowed(compiler, tokenizer, spec, "<tool_call>\n[]\n</tool_call>")
    assert not _allowed(compiler, tokenizer, spec, "Sure!")


def test_tools_offered_with_a_format_allow_a_call_or_the_answer(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    """An agent with tools and a typed final answer (the Agents SDK's output_type) must still be
    able to call a tool: the output is one call, or the answer in its format, nothing else."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": CITY}}
    spec, kind = chat_constraint(TOOLS, "auto", None, fmt)  # type: ignore[misc]
    assert kind == "json_schema"
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _allowed(compiler, tokenizer, spec, call)
    assert _allowed(compiler, tokenizer, spec, '{"city": "Paris"}')
    assert not _allowed(compiler, tokenizer, spec, '{"town": "Paris"}')
    assert not _allowed(compiler, tokenizer, spec, "The weather is fine.")
    assert not _allowed(compiler, tokenizer, spec, f'{call}\n{{"city": "Paris"}}')
    # tool_choice none: the answer alone.
    only, _ = chat_constraint(TOOLS, "none", None, fmt)  # type: ignore[misc]
    assert not _allowed(compiler, tokenizer, only, call)
    assert _allowed(compiler, tokenizer, only, '{"city": "Paris"}')


def test_grammars_are_cached_and_refusals_name_the_feature(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    first, seconds = compiler.compile(spec)
    again, hit = compiler.compile(GrammarSpec.json_schema(json.loads(spec.source)))
    assert again is first and hit is None and seconds is not None
    for schema, named in (
        ({"type": "object", "if": {}, "then": {}}, '"if"'),
        ({"type": "string", "format": "colour"}, "colour"),
        ({"type": "strin"}, "strin"),
    ):
        with pytest.raises(GrammarError, match=named):
            compiler.compile(GrammarSpec.json_schema(schema))


def test_tool_parameters_are_their_own_schema_root(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    """Pydantic writes nested models as `$defs` and `#/$defs/...`, a recursive model as `#`: both
    resolve against the tool's parameters, not against the call around them."""
    address = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    pydantic = {
        "$defs": {"Address": address},
        "type": "object",
        "properties": {"to": {"$ref": "#/$defs/Address"}},
        "required": ["to"],
    }
    tree = {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["label", "children"],
        "additionalProperties": False,
    }
    tools = [
        {"type": "function", "function": {"name": "ship", "parameters": pydantic}},
        {"type": "function", "function": {"name": "tree", "parameters": tree}},
    ]
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": pydantic}}
    ship = '{"name": "ship", "arguments": {"to": {"city": "Oslo"}}}'
    child = '{"label": "b", "children": []}'
    good_tree = '{"name": "tree", "arguments": {"label": "a", "children": [' + child + "]}}"
    call_shaped_child = '{"name": "tree", "arguments": ' + child + "}"
    for choice in ("required", {"type": "function", "function": {"name": "ship"}}):
        spec, _ = chat_constraint(tools, choice, False, None)  # type: ignore[misc]
        assert _allowed(compiler, tokenizer, spec, f"<tool_call>\n{ship}\n</tool_call>")
        assert not _allowed(
            compiler, tokenizer, spec, f"<tool_call>\n{ship.replace('city', 'town')}\n</tool_call>"
        )
    spec, _ = chat_constraint(tools, "required", None, None)  # type: ignore[misc]
    assert _allowed(compiler, tokenizer, spec, f"<tool_call>\n{good_tree}\n</tool_call>")
    assert _allowed(compiler, tokenizer, spec, f"<tool_call>\n[{ship}, {good_tree}]\n</tool_call>")
    bad_tree = good_tree.replace(child, call_shaped_child)
    assert not _allowed(compiler, tokenizer, spec, f"<tool_call>\n{bad_tree}\n</tool_call>")
    spec, _ = chat_constraint(tools, "auto", None, fmt)  # type: ignore[misc]
    assert _allowed(compiler, tokenizer, spec, f"<tool_call>\n[{ship}]\n</tool_call>")
    assert _allowed(compiler, tokenizer, spec, '{"to": {"city": "Oslo"}}')


def test_json_output_keeps_the_schema_key_order(compiler: GrammarCompiler, tokenizer: Any) -> None:
    """A "reasoning before answer" schema only works if the reasoning is written first."""
    schema = {
        "type": "object",
        "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
        "required": ["reasoning", "answer"],
        "additionalProperties": False,
    }
    spec = GrammarSpec.json_schema(schema)
    assert _allowed(compiler, tokenizer, spec, '{"reasoning": "2+2", "answer": 4}')
    assert not _allowed(compiler, tokenizer, spec, '{"answer": 4, "reasoning": "2+2"}')


def test_a_tool_without_parameters_takes_no_arguments(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    spec, _ = chat_constraint(TOOLS, named, None, None)  # type: ignore[misc]
    call = '<tool_call>\n{"name": "get_time", "arguments": ARGS}\n</tool_call>'
    assert _allowed(compiler, tokenizer, spec, call.replace("ARGS", "{}"))
    assert not _allowed(compiler, tokenizer, spec, call.replace("ARGS", '{"zone": "UTC"}'))


def test_tool_arguments_are_always_an_object(compiler: GrammarCompiler, tokenizer: Any) -> None:
    """A call whose arguments are not an object is no call to tools.py: the grammar allows none."""
    untyped = {"properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": untyped}}]
    spec, _ = chat_constraint(tools, "required", False, None)  # type: ignore[misc]
    call = '<tool_call>\n{"name": "get_weather", "arguments": ARGS}\n</tool_call>'
    assert _allowed(compiler, tokenizer, spec, call.replace("ARGS", '{"city": "Oslo"}'))
    assert not _allowed(compiler, tokenizer, spec, call.replace("ARGS", '"Oslo"'))
    stringly = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    with pytest.raises(InvalidRequest) as refused:
        chat_constraint(stringly, "required", None, None)
    assert refused.value.param == "tools"
