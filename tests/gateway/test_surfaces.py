"""Every API surface end to end through the official SDKs, against a fake neuron: Anthropic
messages (streamed and not) and count_tokens, Responses, completions, embeddings."""

from __future__ import annotations

from typing import Any

from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import cluster, spec

CATALOGUE = [spec("chat-a", aliases=["a"]), spec("embed", kind="embedding")]


def neuron() -> FakeNeuron:
    return FakeNeuron("n1", loaded={"chat-a": GiB, "embed": GiB})


async def test_anthropic_messages_non_streamed() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        message = await c.anthropic().messages.create(
            model="a",
            max_tokens=32,
            system="be brief",
            messages=[{"role": "user", "content": "hello there"}],
        )
        assert message.model == "a"  # the name the client used
        assert message.content[0].text == "Hello from n1."  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 3)
        sent = c.neurons["n1"].requests[-1][1]
        assert sent["model"] == "chat-a" and sent["messages"][0]["role"] == "system"


async def test_anthropic_messages_streamed() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        async with c.anthropic().messages.stream(
            model="chat-a", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert final.content[0].text == "Hello from n1."  # type: ignore[union-attr]
        assert final.usage.output_tokens == 3 and final.usage.input_tokens == 1


async def test_count_tokens_asks_the_neurons_tokenizer() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        counted = await c.anthropic().messages.count_tokens(
            model="chat-a",
            system="sys",
            messages=[{"role": "user", "content": "one two three"}],
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
        path, body = c.neurons["n1"].requests[-1]
        assert path == "/tokenize"
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["tools"][0]["function"]["name"] == "f"
        assert counted.input_tokens == 1 + 3 + 10  # the fake's count: words, plus 10 per tool


async def test_count_tokens_counts_the_prompt_that_messages_would_render() -> None:
    """The tools shown (none with tool_choice none, the named one when forced) and a prefill
    left open: as /v1/messages renders them, so the count matches its input_tokens."""
    tools: Any = [{"name": name, "input_schema": {"type": "object"}} for name in ("f", "g", "h")]
    ask = [{"role": "user", "content": "one two three"}]
    prefilled = [*ask, {"role": "assistant", "content": "Sure:"}]
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        client = c.anthropic()
        cases: list[tuple[dict[str, Any], list[Any], list[str] | None, bool | None]] = [
            ({"type": "auto"}, ask, ["f", "g", "h"], None),
            ({"type": "none"}, ask, None, None),
            ({"type": "tool", "name": "g"}, ask, ["g"], None),
            ({"type": "auto"}, prefilled, ["f", "g", "h"], True),
            ({"type": "tool", "name": "g"}, prefilled, ["f", "g", "h"], True),  # nothing forced
        ]
        for choice, messages, shown, continued in cases:
            await client.messages.count_tokens(
                model="chat-a", messages=messages, tools=tools, tool_choice=choice
            )
            path, body = c.neurons["n1"].requests[-1]
            assert path == "/tokenize"
            names = [t["function"]["name"] for t in body.get("tools") or []] or None
            assert (names, body.get("continue_final_message")) == (shown, continued), choice


async def test_responses_non_streamed_and_streamed() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        client = c.openai()
        response = await client.responses.create(model="chat-a", input="hi", instructions="x")
        assert response.output_text == "Hello from n1."
        assert response.status == "completed" and response.usage is not None
        async with client.responses.stream(model="chat-a", input="hi") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.output_text == "Hello from n1."


async def test_completions_and_embeddings() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        client = c.openai()
        completion = await client.completions.create(model="chat-a", prompt="once upon")
        assert completion.choices[0].text == "Hello from n1."
        stream = await client.completions.create(model="chat-a", prompt="once", stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream]) == "Hello from n1."
        vectors = await client.embeddings.create(model="embed", input=["a b", "c"])
        assert [v.embedding for v in vectors.data] == [[0.1, 0.2, 0.3]] * 2
        assert vectors.usage.prompt_tokens == 3


async def test_fleet_page_and_its_json() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        page = await c.http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'fetch("/fleet/panel"' in page.text
        fleet = (await c.http.get("/fleet")).json()
        assert fleet["status"] == "ok"
        (n1,) = fleet["neurons"]
        assert n1["name"] == "n1" and n1["healthy"] is True
        assert n1["devices"][0]["memory_total"] == 8 * GiB
        assert {r["id"]: r["state"] for r in n1["replicas"]} == {
            "chat-a": "ready",
            "embed": "ready",
        }
        assert {m["id"] for m in fleet["models"]} == {"chat-a", "embed"}
