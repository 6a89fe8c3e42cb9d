"""A scripted model server for tests: real agent CLIs run against it offline.

It speaks the Anthropic Messages API (``POST /v1/messages``, streamed as Anthropic streams it
and as plain JSON, plus ``/v1/messages/count_tokens``) and OpenAI's Chat Completions and
Responses APIs (``/v1/chat/completions``, ``/v1/responses``, streamed and not), and answers
``GET /v1/models`` in a shape both vendors' clients accept.

Each request that offers tools takes the next :class:`Step` of the script: some text, tool
calls by name with their input, or both. Once the script is spent it answers ``FINAL_TEXT``.
Requests that offer no tools are a CLI's side requests (title generation, quota probes, a
"haiku" summary...): they get ``SIDE_TEXT`` and never consume a step, so a script says only
what the agent's main loop does. Every request is recorded with its headers and the usage the
server reported in its answer, so a test can check which key arrived and compare token counts
with what a gateway counted.

Everything is deterministic: ids are numbered per server, token counts are computed from the
request's and the answer's sizes, timestamps are fixed, and streams are cut at fixed sizes.

Usage::

    with ModelServer([call("Bash", command="touch x"), say("done")]) as models:
        env["ANTHROPIC_BASE_URL"] = models.url
        ...
        assert models.scripted()[0].api_key == "sk-test"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from devforge import ServerThread

FINAL_TEXT = "All done."
SIDE_TEXT = "Scripted session"
DEFAULT_MODEL = "scripted-model"
# A fixed clock: answers carry it where the APIs want a timestamp.
CREATED = 1_767_225_600
# Streams are cut into pieces of this many characters, so clients must reassemble deltas.
CHUNK = 16

Api = Literal["anthropic", "openai-chat", "openai-responses", "models", "other"]
Kind = Literal["scripted", "final", "side", "count_tokens", "models", "unknown", "invalid"]


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One tool call the model makes: the tool's name as the CLI offered it, and its input."""

    name: str
    input: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Step:
    """One assistant turn: optional text, then tool calls (none: the turn ends the loop)."""

    text: str = ""
    calls: tuple[ToolCall, ...] = ()


def say(text: str) -> Step:
    """A turn that only talks (and so ends the agent's loop)."""
    return Step(text=text)


def call(name: str, /, text: str = "", **input: Any) -> Step:
    """A turn that calls one tool, e.g. ``call("Bash", command="ls")``."""
    return Step(text=text, calls=(ToolCall(name, dict(input)),))


def calls(*tool_calls: ToolCall, text: str = "") -> Step:
    """A turn that calls several tools at once."""
    return Step(text=text, calls=tuple(tool_calls))


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts as the server reported them in one answer."""

    input_tokens: int
    output_tokens: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)


@dataclasses.dataclass
class Seen:
    """One request the server received, and what it answered."""

    n: int
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON body, or None
    api: Api
    kind: Kind
    stream: bool
    step: int | None  # the index of the script step it took
    usage: Usage | None  # what the answer reported (None: it reported none)
    status: int

    @property
    def api_key(self) -> str | None:
        """The key the client sent: ``x-api-key``, else a bearer token."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None

    @property
    def tools(self) -> list[str]:
        """The names of the tools the request offered."""
        if not isinstance(self.body, dict):
            return []
        names = []
        for tool in self.body.get("tools") or []:
            if isinstance(tool, dict):
                name = tool.get("name") or (tool.get("function") or {}).get("name")
                if isinstance(name, str):
                    names.append(name)
        return names

    def text(self) -> str:
        """The request body as text, to search for what the conversation carried."""
        return json.dumps(self.body, ensure_ascii=False)


class ModelServer:
    """The scripted model server on ``127.0.0.1:<free port>``, in a thread."""

    def __init__(
        self,
        script: Iterable[Step] = (),
        *,
        final_text: str = FINAL_TEXT,
        side_text: str = SIDE_TEXT,
    ) -> None:
        self._lock = threading.Lock()
        self._script: list[Step] = list(script)
        self._next = 0
        self._seen: list[Seen] = []
        self.final_text = final_text
        self.side_text = side_text
        self._thread = ServerThread(self._app())
        self.url = self._thread.url

    # --- the test's side ------------------------------------------------------------------

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> ModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def load(self, script: Iterable[Step]) -> None:
        """Append steps to the script (e.g. for a second run of the same agent)."""
        with self._lock:
            self._script.extend(script)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._script) - self._next

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def scripted(self) -> list[Seen]:
        """The requests of the agent's main loop: those that offered tools."""
        return [s for s in self.requests if s.kind in ("scripted", "final")]

    def usage(self) -> Usage:
        """The sum of the usage the server reported over all its answers."""
        total = Usage(0, 0)
        for seen in self.requests:
            if seen.usage is not None:
                total = total + seen.usage
        return total

    # --- the server's side ----------------------------------------------------------------

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/models", self._models, methods=["GET"]),
                Route("/{rest:path}", self._unknown, methods=["GET", "POST", "PUT", "HEAD", "DELETE"]),
            ]
        )

    def _take(self, offers_tools: bool) -> tuple[Kind, Step, int | None]:
        """The step this request gets, and whether it consumed one."""
        if not offers_tools:
            return "side", Step(text=self.side_text), None
        with self._lock:
            if self._next < len(self._script):
                index = self._next
                self._next += 1
                return "scripted", self._script[index], index
        return "final", Step(text=self.final_text), None

    def _record(self, request: Request, body: Any, raw: bytes, **fields: Any) -> None:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        with self._lock:
            self._seen.append(
                Seen(
                    n=len(self._seen),
                    method=request.method,
                    path=request.url.path,
                    headers=headers,
                    body=body,
                    **fields,
                )
            )

    async def _read(self, request: Request) -> tuple[bytes, Any]:
        raw = await request.body()
        try:
            return raw, json.loads(raw) if raw else None
        except ValueError:
            return raw, None

    def _invalid(self, request: Request, raw: bytes, api: Api) -> Response:
        self._record(request, None, raw, api=api, kind="invalid", stream=False, step=None, usage=None, status=400)
        return JSONResponse(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "body is not a JSON object"}},
            status_code=400,
        )

    async def _anthropic(self, request: Request) -> Response:
        raw, body = await self._read(request)
        if not isinstance(body, dict):
            return self._invalid(request, raw, "anthropic")
        kind, step, index = self._take(bool(body.get("tools")))
        stream = body.get("stream") is True
        usage = Usage(_tokens(raw), _output_tokens(step))
        self._record(request, body, raw, api="anthropic", kind=kind, stream=stream, step=index, usage=usage, status=200)
        reply = _AnthropicReply(_reply_id(raw), str(body.get("model") or DEFAULT_MODEL), step, usage)
        if stream:
            return _sse(reply.events())
        return JSONResponse(reply.message())

    async def _count_tokens(self, request: Request) -> Response:
        raw, body = await self._read(request)
        self._record(
            request, body, raw, api="anthropic", kind="count_tokens", stream=False, step=None, usage=None, status=200
        )
        return JSONResponse({"input_tokens": _tokens(raw)})

    async def _chat(self, request: Request) -> Response:
        raw, body = await self._read(request)
        if not isinstance(body, dict):
            return self._invalid(request, raw, "openai-chat")
        kind, step, index = self._take(bool(body.get("tools")))
        stream = body.get("stream") is True
        options = body.get("stream_options")
        # A stream reports usage only when asked, in a last chunk with no choices, as OpenAI does.
        reports_usage = not stream or (isinstance(options, dict) and options.get("include_usage") is True)
        usage = Usage(_tokens(raw), _output_tokens(step))
        self._record(
            request,
            body,
            raw,
            api="openai-chat",
            kind=kind,
            stream=stream,
            step=index,
            usage=usage if reports_usage else None,
            status=200,
        )
        reply = _ChatReply(_reply_id(raw), str(body.get("model") or DEFAULT_MODEL), step, usage)
        if stream:
            return _sse(reply.chunks(reports_usage), openai=True)
        return JSONResponse(reply.completion())

    async def _responses(self, request: Request) -> Response:
        raw, body = await self._read(request)
        if not isinstance(body, dict):
            return self._invalid(request, raw, "openai-responses")
        kind, step, index = self._take(bool(body.get("tools")))
        stream = body.get("stream") is True
        usage = Usage(_tokens(raw), _output_tokens(step))
        self._record(
            request, body, raw, api="openai-responses", kind=kind, stream=stream, step=index, usage=usage, status=200
        )
        custom = {
            str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "custom"
        }
        namespaces = {
            str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "namespace"
        }
        reply = _ResponsesReply(
            _reply_id(raw), str(body.get("model") or DEFAULT_MODEL), step, usage, custom, namespaces
        )
        if stream:
            return _sse(reply.events())
        return JSONResponse(reply.response("completed"))

    async def _models(self, request: Request) -> Response:
        self._record(request, None, b"", api="models", kind="models", stream=False, step=None, usage=None, status=200)
        # One list both vendors' clients read: Anthropic's fields and OpenAI's side by side.
        model = {
            "id": DEFAULT_MODEL,
            "type": "model",
            "object": "model",
            "display_name": "Scripted model",
            "created": CREATED,
            "created_at": "2026-01-01T00:00:00Z",
            "owned_by": "forgebottle-tests",
        }
        return JSONResponse(
            {"object": "list", "data": [model], "has_more": False, "first_id": DEFAULT_MODEL, "last_id": DEFAULT_MODEL}
        )

    async def _unknown(self, request: Request) -> Response:
        raw, body = await self._read(request)
        self._record(request, body, raw, api="other", kind="unknown", stream=False, step=None, usage=None, status=404)
        return JSONResponse({"type": "error", "error": {"type": "not_found_error", "message": "not found"}}, 404)


# --- answers ------------------------------------------------------------------------------


def _reply_id(raw: bytes) -> str:
    """An id for the answer to ``raw``: the same request always gets the same ids, and since
    each turn's request carries the whole conversation so far, no two turns share one (a
    second run that continues a session sees the first run's ids, and its own differ)."""
    return hashlib.sha256(raw).hexdigest()[:20]


def _tokens(data: bytes | str) -> int:
    """A stand-in tokenizer: about four bytes a token, at least one."""
    size = len(data.encode() if isinstance(data, str) else data)
    return max(1, size // 4)


def _output_tokens(step: Step) -> int:
    return _tokens(step.text + "".join(c.name + _json(c.input) for c in step.calls))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _pieces(text: str) -> Iterator[str]:
    for start in range(0, len(text), CHUNK):
        yield text[start : start + CHUNK]


def _sse(events: Iterable[tuple[str | None, Any]], *, openai: bool = False) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for name, data in events:
            head = f"event: {name}\n" if name else ""
            yield f"{head}data: {_json(data)}\n\n".encode()
        if openai:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@dataclasses.dataclass
class _AnthropicReply:
    rid: str
    model: str
    step: Step
    usage: Usage

    def blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.step.text:
            blocks.append({"type": "text", "text": self.step.text})
        for i, c in enumerate(self.step.calls):
            blocks.append({"type": "tool_use", "id": f"toolu_{self.rid}{i:02d}", "name": c.name, "input": c.input})
        return blocks

    def _head(self, output_tokens: int, stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": f"msg_{self.rid}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    @property
    def stop_reason(self) -> str:
        return "tool_use" if self.step.calls else "end_turn"

    def message(self) -> dict[str, Any]:
        return {**self._head(self.usage.output_tokens, self.stop_reason), "content": self.blocks()}

    def events(self) -> Iterator[tuple[str, Any]]:
        # message_start carries the input count and a first output token; message_delta the
        # final cumulative output count (Anthropic's own convention: a counter sums the two).
        yield "message_start", {"type": "message_start", "message": {**self._head(1, None), "content": []}}
        yield "ping", {"type": "ping"}
        for index, block in enumerate(self.blocks()):
            if block["type"] == "text":
                yield (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                )
                for piece in _pieces(block["text"]):
                    yield (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}},
                    )
            else:
                start = {**block, "input": {}}
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
                for piece in ["", *_pieces(_json(block["input"]))]:
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": self.usage.output_tokens},
            },
        )
        yield "message_stop", {"type": "message_stop"}


@dataclasses.dataclass
class _ChatReply:
    rid: str
    model: str
    step: Step
    usage: Usage

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{self.rid}{i:02d}",
                "type": "function",
                "function": {"name": c.name, "arguments": _json(c.input)},
            }
            for i, c in enumerate(self.step.calls)
        ]

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.step.calls else "stop"

    def _usage(self) -> dict[str, int]:
        u = self.usage
        return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total}

    def _chunk(self, choices: list[dict[str, Any]], usage: Any, with_usage: bool) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.rid}",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            chunk["usage"] = usage
        return chunk

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.step.text or None}
        if self.step.calls:
            message["tool_calls"] = self._calls()
        return {
            "id": f"chatcmpl-{self.rid}",
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}],
            "usage": self._usage(),
        }

    def chunks(self, with_usage: bool) -> Iterator[tuple[None, Any]]:
        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]

        yield None, self._chunk(choice({"role": "assistant", "content": ""}), None, with_usage)
        for piece in _pieces(self.step.text):
            yield None, self._chunk(choice({"content": piece}), None, with_usage)
        for i, tool_call in enumerate(self._calls()):
            head = {
                "index": i,
                "id": tool_call["id"],
                "type": "function",
                "function": {"name": tool_call["function"]["name"], "arguments": ""},
            }
            yield None, self._chunk(choice({"tool_calls": [head]}), None, with_usage)
            for piece in _pieces(tool_call["function"]["arguments"]):
                yield (
                    None,
                    self._chunk(
                        choice({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}), None, with_usage
                    ),
                )
        yield None, self._chunk(choice({}, self.finish_reason), None, with_usage)
        if with_usage:
            yield None, self._chunk([], self._usage(), True)


@dataclasses.dataclass
class _ResponsesReply:
    rid: str
    model: str
    step: Step
    usage: Usage
    custom: set[str]  # tools offered as free-form ("custom") tools: their input is a string
    namespaces: set[str]

    def items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if self.step.text:
            items.append(
                {
                    "id": f"msg_{self.rid}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": self.step.text, "annotations": []}],
                }
            )
        for i, c in enumerate(self.step.calls):
            call_id = f"call_{self.rid}{i:02d}"
            if c.name in self.custom:
                # A free-form tool takes one string: the script gives it as {"input": "..."}.
                items.append(
                    {
                        "id": f"ctc_{self.rid}{i:02d}",
                        "type": "custom_tool_call",
                        "status": "completed",
                        "call_id": call_id,
                        "name": c.name,
                        "input": str(c.input.get("input", "")),
                    }
                )
            else:
                item = {
                    "id": f"fc_{self.rid}{i:02d}",
                    "type": "function_call",
                    "status": "completed",
                    "call_id": call_id,
                    "name": c.name,
                    "arguments": _json(c.input),
                }
                namespace, _, short = c.name.rpartition("__")
                if namespace in self.namespaces:
                    item.update(name=short, namespace=namespace)
                items.append(item)
        return items

    def response(self, status: str, output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": f"resp_{self.rid}",
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "model": self.model,
            "output": self.items() if output is None else output,
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage.total,
            }
            if done
            else None,
        }

    def events(self) -> Iterator[tuple[str, Any]]:
        seq = iter(range(1_000_000))

        def event(kind: str, **fields: Any) -> tuple[str, Any]:
            return kind, {"type": kind, "sequence_number": next(seq), **fields}

        yield event("response.created", response=self.response("in_progress", []))
        yield event("response.in_progress", response=self.response("in_progress", []))
        for index, item in enumerate(self.items()):
            item_id = item["id"]
            if item["type"] == "message":
                text = item["content"][0]["text"]
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event(
                    "response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part
                )
                for piece in _pieces(text):
                    yield event(
                        "response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=piece
                    )
                yield event(
                    "response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                )
                yield event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part={**part, "text": text},
                )
            elif item["type"] == "function_call":
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
                for piece in _pieces(item["arguments"]):
                    yield event(
                        "response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece
                    )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    arguments=item["arguments"],
                )
            else:
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "input": ""},
                )
                for piece in _pieces(item["input"]):
                    yield event(
                        "response.custom_tool_call_input.delta", item_id=item_id, output_index=index, delta=piece
                    )
                yield event(
                    "response.custom_tool_call_input.done", item_id=item_id, output_index=index, input=item["input"]
                )
            yield event("response.output_item.done", output_index=index, item=item)
        yield event("response.completed", response=self.response("completed"))
