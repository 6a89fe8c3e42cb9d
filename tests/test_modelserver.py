"""The scripted model server over real loopback HTTP, read the way a client reads each API.

The streams are parsed as SSE and folded back into messages by the rules each vendor
documents (Anthropic: content blocks and their deltas; OpenAI Chat: choice deltas and indexed
tool-call fragments; Responses: output items and their argument deltas), so a server that
streamed something a client could not reassemble fails here, not in a slow CLI test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.modelserver import FINAL_TEXT, SIDE_TEXT, ModelServer, ToolCall, Usage, call, calls, say

KEY = "sk-test-modelserver-key"
TOOLS_ANTHROPIC = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
TOOLS_CHAT = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]


@pytest.fixture
def models() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events: list[tuple[str | None, str]] = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


def without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def anthropic(models: ModelServer, *, stream: bool, tools: bool = True, key: str = KEY) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "claude-test",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "go"}],
    }
    if tools:
        body["tools"] = TOOLS_ANTHROPIC
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return httpx.post(models.url + "/v1/messages", json=body, headers=headers)


def fold_anthropic(response: httpx.Response) -> tuple[dict[str, Any], list[str | None]]:
    """The message a stream adds up to, and the order of its event types."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    order = []
    for name, data in sse(response):
        event = json.loads(data)
        assert event["type"] == name
        order.append(name)
        if name == "message_start":
            message = event["message"]
        elif name == "content_block_start":
            assert event["index"] == len(message["content"])
            message["content"].append(event["content_block"])
        elif name == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and event["index"] in partial:
            message["content"][event["index"]]["input"] = json.loads(partial[event["index"]])
        elif name == "message_delta":
            message.update(event["delta"])
            message["usage"]["output_tokens"] = event["usage"]["output_tokens"]
    return message, order


def test_anthropic_stream_folds_back_into_the_scripted_turn(models: ModelServer) -> None:
    models.load(
        [calls(ToolCall("Bash", {"command": "echo é > x"}), ToolCall("Read", {"file_path": "/x"}), text="Two.")]
    )
    response = anthropic(models, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    message, order = fold_anthropic(response)
    assert order[:2] == ["message_start", "ping"] and order[-2:] == ["message_delta", "message_stop"]
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    assert message["content"][0]["text"] == "Two."
    assert message["content"][1]["name"] == "Bash" and message["content"][1]["input"] == {"command": "echo é > x"}
    assert message["content"][2]["input"] == {"file_path": "/x"}
    assert message["content"][1]["id"] != message["content"][2]["id"]
    assert message["stop_reason"] == "tool_use"
    seen = models.requests[-1]
    assert (seen.kind, seen.step, seen.stream, seen.api_key) == ("scripted", 0, True, KEY)
    # What a counter reads (message_start's input, message_delta's output) is what was recorded.
    assert seen.usage == Usage(message["usage"]["input_tokens"], message["usage"]["output_tokens"])


def test_anthropic_json_is_the_same_message_as_the_stream() -> None:
    script = [call("Bash", command="ls", text="Looking.")]
    with ModelServer(script) as streamed, ModelServer(script) as plain:
        folded, _ = fold_anthropic(anthropic(streamed, stream=True))
        whole = anthropic(plain, stream=False).json()
    # Ids come from the request, and these two differ in "stream": the rest is equal.
    assert without_ids(whole["content"]) == without_ids(folded["content"])
    assert whole["stop_reason"] == folded["stop_reason"] == "tool_use"
    assert whole["usage"]["output_tokens"] == folded["usage"]["output_tokens"]
    assert plain.requests[0].usage == Usage(whole["usage"]["input_tokens"], whole["usage"]["output_tokens"])


def test_side_requests_take_no_step(models: ModelServer) -> None:
    models.load([say("scripted")])
    side = anthropic(models, stream=False, tools=False).json()
    assert side["content"] == [{"type": "text", "text": SIDE_TEXT}]
    count = httpx.post(models.url + "/v1/messages/count_tokens", json={"messages": []}).json()
    assert count["input_tokens"] >= 1
    listed = httpx.get(models.url + "/v1/models").json()
    assert listed["data"][0]["id"] and listed["has_more"] is False and listed["object"] == "list"
    assert httpx.head(models.url + "/api/hello").status_code == 404
    assert models.remaining == 1
    assert anthropic(models, stream=False).json()["content"][0]["text"] == "scripted"
    assert [s.kind for s in models.requests] == ["side", "count_tokens", "models", "unknown", "scripted"]
    assert models.scripted() == models.requests[-1:]


def test_a_spent_script_answers_the_final_text(models: ModelServer) -> None:
    models.load([say("only step")])
    texts = [anthropic(models, stream=False).json()["content"][0]["text"] for _ in range(3)]
    assert texts == ["only step", FINAL_TEXT, FINAL_TEXT]
    assert [(s.kind, s.step) for s in models.requests] == [("scripted", 0), ("final", None), ("final", None)]
    assert models.remaining == 0


def test_bad_bodies_are_refused_and_recorded(models: ModelServer) -> None:
    models.load([say("kept")])
    for path in ("/v1/messages", "/v1/chat/completions", "/v1/responses"):
        response = httpx.post(models.url + path, content=b"\xff\xfe not json", headers={"authorization": "Bearer b"})
        assert response.status_code == 400
        assert "not json" not in response.text  # the answer does not echo the input
    assert [(s.kind, s.status, s.api_key) for s in models.requests] == [("invalid", 400, "b")] * 3
    assert models.remaining == 1


def chat(models: ModelServer, *, stream: bool, include_usage: bool = False) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "gpt-test",
        "stream": stream,
        "tools": TOOLS_CHAT,
        "messages": [{"role": "user", "content": "go"}],
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return httpx.post(
        models.openai_base_url + "/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
    )


def fold_chat(response: httpx.Response) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The assistant message a Chat Completions stream adds up to, and its raw chunks."""
    events = sse(response)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    message: dict[str, Any] = {"content": "", "tool_calls": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            for fragment in delta.get("tool_calls", []):
                if fragment["index"] == len(message["tool_calls"]):
                    message["tool_calls"].append(
                        {"id": fragment["id"], "name": fragment["function"]["name"], "arguments": ""}
                    )
                message["tool_calls"][fragment["index"]]["arguments"] += fragment["function"]["arguments"]
            if choice["finish_reason"]:
                message["finish_reason"] = choice["finish_reason"]
    return message, chunks


def test_chat_stream_reports_usage_in_a_last_chunk_only_when_asked(models: ModelServer) -> None:
    models.load([call("shell", command=["ls", "-la"], text="Listing."), call("shell", command=["true"])])
    message, chunks = fold_chat(chat(models, stream=True, include_usage=True))
    assert message["content"] == "Listing." and message["finish_reason"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in message["tool_calls"]] == [
        ("shell", {"command": ["ls", "-la"]})
    ]
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert models.requests[0].usage == Usage(usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    _, chunks = fold_chat(chat(models, stream=True))
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert models.requests[1].usage is None  # nothing reported, nothing recorded


def test_chat_json_matches_the_stream() -> None:
    script = [call("shell", command=["ls"])]
    with ModelServer(script) as streamed, ModelServer(script) as plain:
        folded, _ = fold_chat(chat(streamed, stream=True, include_usage=True))
        whole = chat(plain, stream=False).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == folded["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"]["arguments"] == folded["tool_calls"][0]["arguments"]
    usage = whole["usage"]
    assert plain.requests[0].usage == Usage(usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["completion_tokens"] == streamed.requests[0].usage.output_tokens  # type: ignore[union-attr]


def responses(models: ModelServer, *, stream: bool) -> httpx.Response:
    tools = [
        {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
        {"type": "namespace", "name": "mcp__forge", "tools": [{"type": "function", "name": "read_issue"}]},
        {"type": "custom", "name": "apply_patch"},
    ]
    body = {"model": "gpt-test", "stream": stream, "tools": tools, "input": [{"role": "user", "content": "go"}]}
    return httpx.post(models.openai_base_url + "/responses", json=body, headers={"authorization": f"Bearer {KEY}"})


def test_responses_stream_folds_into_items_with_namespaces_and_custom_tools(models: ModelServer) -> None:
    models.load(
        [
            calls(
                ToolCall("exec_command", {"cmd": "echo hi > f"}),
                ToolCall("mcp__forge__read_issue", {}),
                ToolCall("apply_patch", {"input": "*** Begin Patch\n*** End Patch\n"}),
                text="Working.",
            )
        ]
    )
    events = sse(responses(models, stream=True))
    bodies = [json.loads(data) for _, data in events]
    assert [b["type"] for b in bodies] == [name for name, _ in events]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    assert bodies[0]["type"] == "response.created" and bodies[-1]["type"] == "response.completed"
    items: dict[int, dict[str, Any]] = {}
    text = ""
    for b in bodies:
        if b["type"] == "response.output_item.added":
            items[b["output_index"]] = dict(b["item"])
        elif b["type"] == "response.output_text.delta":
            text += b["delta"]
        elif b["type"] == "response.function_call_arguments.delta":
            items[b["output_index"]]["arguments"] += b["delta"]
        elif b["type"] == "response.custom_tool_call_input.delta":
            items[b["output_index"]]["input"] += b["delta"]
        elif b["type"] == "response.output_item.done":
            done = b["item"]
            assert {k: v for k, v in items[b["output_index"]].items() if k not in ("status", "content")} == {
                k: v for k, v in done.items() if k not in ("status", "content")
            }
    final = bodies[-1]["response"]
    assert text == "Working."
    kinds = [(i["type"], i.get("name"), i.get("namespace")) for i in final["output"]]
    assert kinds == [
        ("message", None, None),
        ("function_call", "exec_command", None),
        ("function_call", "read_issue", "mcp__forge"),
        ("custom_tool_call", "apply_patch", None),
    ]
    assert json.loads(final["output"][1]["arguments"]) == {"cmd": "echo hi > f"}
    assert final["output"][3]["input"] == "*** Begin Patch\n*** End Patch\n"
    usage = final["usage"]
    assert models.requests[0].usage == Usage(usage["input_tokens"], usage["output_tokens"])
    assert models.requests[0].api_key == KEY


def test_responses_json_is_the_completed_response() -> None:
    script = [call("exec_command", cmd="true")]
    with ModelServer(script) as streamed, ModelServer(script) as plain:
        completed = json.loads(sse(responses(streamed, stream=True))[-1][1])["response"]
        whole = responses(plain, stream=False).json()
    assert without_ids(whole["output"]) == without_ids(completed["output"])
    assert whole["usage"] == completed["usage"]
    assert whole["status"] == "completed"


def test_answers_are_deterministic_and_ids_differ_between_turns() -> None:
    script = [call("Bash", command="ls"), call("Bash", command="ls")]
    with ModelServer(script) as one, ModelServer(script) as two:
        first = [anthropic(one, stream=True).content, anthropic(one, stream=True, key="other").content]
        second = [anthropic(two, stream=True).content, anthropic(two, stream=True, key="other").content]
    assert first == second
    # The same request gets the same ids; a conversation's next turn is a different request.
    ids = [fold_anthropic(httpx.Response(200, content=body))[0]["content"][0]["id"] for body in first]
    assert ids[0] == ids[1]  # the key is a header: the bodies, and so the ids, are equal
    with ModelServer(script) as three:
        a = anthropic(three, stream=False).json()["content"][0]["id"]
        body = {
            "model": "m",
            "max_tokens": 1,
            "tools": TOOLS_ANTHROPIC,
            "messages": [{"role": "user", "content": "next"}],
        }
        b = httpx.post(three.url + "/v1/messages", json=body).json()["content"][0]["id"]
    assert a != b


def test_usage_adds_up_what_was_reported(models: ModelServer) -> None:
    models.load([say("a"), say("b")])
    reported = [anthropic(models, stream=False).json()["usage"] for _ in range(2)]
    chat(models, stream=True)  # a stream that reports nothing adds nothing
    assert models.requests[2].usage is None
    total = models.usage()
    assert total == Usage(sum(u["input_tokens"] for u in reported), sum(u["output_tokens"] for u in reported))
    assert total.total == total.input_tokens + total.output_tokens > 0
