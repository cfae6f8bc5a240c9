"""Rendering OpenAI-shaped messages (and tools) through a model's own chat template."""

from __future__ import annotations

import json
from typing import Any

# For templates that know nothing of tools: the Hermes convention most open models were tuned on.
HERMES_TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available "
    "tools: <tools>{tools}</tools>\nFor each function call return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


def template_knows_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template or ""
    return "tools" in template and "tool_call" in template


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    continue_final: bool = False,
    generation_prompt: bool = True,
) -> str:
    """The prompt text the model expects, ending with the assistant's generation prompt; or,
    `continue_final`, with the last (assistant) message left open for the model to go on with."""
    ending = {
        "add_generation_prompt": generation_prompt and not continue_final,
        "continue_final_message": continue_final,
    }
    if tools and template_knows_tools(tokenizer):
        messages = [_plain(m) for m in messages]
        return str(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **ending))
    messages = [_hermes(m) for m in messages]
    if tools:
        messages = _with_tools_prompt(messages, tools)
    if not tokenizer.chat_template:  # base models: a plain transcript
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"] if ending["add_generation_prompt"] else lines)
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **ending))


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    out["content"] = message.get("content") or ""
    for call in out.get("tool_calls") or []:  # templates expect arguments as a mapping
        function = call.get("function", {})
        if isinstance(function.get("arguments"), str):
            function["arguments"] = _loads(function["arguments"])
    return out


def _hermes(message: dict[str, Any]) -> dict[str, Any]:
    """Tool calls and tool results as text, for templates that only know role + content."""
    role, content = message["role"], message.get("content") or ""
    if role == "developer":
        role = "system"
    if role == "assistant" and message.get("tool_calls"):
        blocks = []
        for call in message["tool_calls"]:
            function = call.get("function", {})
            payload = {"name": function.get("name"), "arguments": _loads(function.get("arguments"))}
            blocks.append(f"<tool_call>\n{json.dumps(payload)}\n</tool_call>")
        content = "\n".join([content, *blocks]).strip()
    if role in ("tool", "function"):
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    return {"role": role, "content": content}


def _with_tools_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    signatures = " ".join(json.dumps(tool) for tool in tools)
    prompt = HERMES_TOOLS_PROMPT.format(tools=signatures)
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _loads(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments or {}
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
