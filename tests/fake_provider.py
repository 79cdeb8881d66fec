#!/usr/bin/env python3
"""Fake LLM provider for the gateway's integration tests (standard library only).

``FakeProvider`` runs an HTTP/1.1 server (keep-alive, chunked SSE) on 127.0.0.1 in a background
thread with its own asyncio loop and speaks, closely enough for the official ``openai`` and
``anthropic`` SDKs, these endpoints (each also accepted without the ``/v1`` prefix):

  POST /v1/chat/completions   OpenAI Chat Completions (JSON, or SSE with ``stream: true``)
  POST /v1/messages           Anthropic Messages (JSON, or SSE)
  POST /v1/responses          OpenAI Responses (JSON, or SSE)
  POST /v1/embeddings         OpenAI embeddings (``encoding_format`` float or base64)
  GET  /v1/models, /v1/models/<id>, /health
  GET  /_fake/stats, POST /_fake/reset   counters for tests that run the fake in another process

Token accounting is deterministic and identical to the fake upstream of the external
benchmark harness (scripts/bench.sh, docs/PERFORMANCE.md):
prompt tokens = max(1, ceil(prompt characters / 4)) (see ``prompt_tokens``); completion tokens =
number of content chunks (default 20, text ``"".join(WORDS[i % len(WORDS)] ...)``).
``max_completion_tokens``/``max_tokens``/``max_output_tokens`` below the chunk count truncate
(finish_reason "length" / stop_reason "max_tokens" / status "incomplete").

Behaviour is selected by substrings of the request's ``model`` (combine freely, e.g.
``gpt-4o-mini-chunks-5-delay-50``); responses echo ``model`` unchanged:
  fail-<status>   that status (400-599, e.g. 400 401 403 404 422 429 500 503) with the native error
                  body; 429 adds ``retry-after: 1``; the 400 message contains a fake key and an
                  internal URL (``SECRET_IN_ERRORS``, ``URL_IN_ERRORS``) to test redaction
  fail-midstream  200, then about half the SSE events (or half the JSON body), then a TCP close
                  without the terminating chunk
  dropafter-<n>   stream the preamble events and n content chunks, then close the TCP connection
  cutstream       200 and the stream's headers, then a TCP close before the first event
  errorfirst      200, and the stream's first event is an error in the API's own shape
                  (as OpenRouter and some OpenAI-compatible servers report failures)
  slow-<ms>       extra wait before the first byte (the constructor's latency_ms adds to it)
  hang            never answer; the connection is closed once the client goes away
  chunks-<n>      n content chunks (= completion tokens) instead of the default
  delay-<ms>      wait between SSE events
  nousage         no usage anywhere: chat streams never send the usage chunk (even with
                  include_usage), messages events and bodies carry no ``usage``, the Responses
                  API's ``usage`` is null; non-streamed answers likewise
  resetafter-<n>  like dropafter-<n>, but the connection is reset (TCP RST, not FIN); a JSON
                  answer is reset after half its body
  stallafter-<n>  stream the preamble and n content chunks, then never send another byte (the
                  connection stays open until the client goes); a JSON answer stalls after
                  half its body
  garbage         after the preamble and the content chunks, events that are no SSE/JSON at
                  all (broken JSON, invalid UTF-8, a field-less line), then a clean end of the
                  body without the closing events; a JSON answer is a 200 of non-JSON bytes
  cached-<n>      n cached prompt tokens, on top of the uncached count P: chat prompt_tokens = P + n
                  with cached_tokens n; messages input_tokens = P with cache_read_input_tokens n;
                  responses input_tokens = P + n with cached_tokens n
  cachewrite-<n>  messages only: cache_creation_input_tokens = n
  tools           answer with one call of ``get_weather`` with arguments ``{"city": "Paris"}``
                  (streamed in 4 fragments = 4 completion tokens; max-token caps are ignored)
  echokey         fail (fail-<status>, default 401) with an error that echoes the credential the
                  fake was sent (``Authorization`` and ``x-api-key``, in full) in its message and
                  in an ``x-echo-authorization`` header, as careless OpenAI-compatible servers
                  do; with ``plain`` the body is text/plain, with ``errorfirst`` (streams) it
                  is a 200 whose first event is that error, with ``latefail`` (streams) the
                  answer starts and its fourth event is that error
  sseframing      streams framed as some servers frame them: CRLF line ends, a comment before
                  every event, and a blank line after every third event

Run in the foreground:  python tests/fake_provider.py --port 9100
"""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http
import itertools
import json
import logging
import math
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast

logger = logging.getLogger(__name__)

WORDS = (
    "Hello",
    " from",
    " the",
    " fake",
    " upstream",
    ".",
    " This",
    " text",
    " is",
    " deterministic",
    " and",
    " every",
    " chunk",
    " counts",
    " as",
    " one",
    " token",
    ",",
    " so",
    " budgets",
    " can",
    " be",
    " checked",
    " exactly",
    "!",
)
TOOL_NAME = "get_weather"
TOOL_ARGUMENT_PIECES = ('{"city"', ': "', "Paris", '"}')
TOOL_ARGUMENTS = "".join(TOOL_ARGUMENT_PIECES)  # '{"city": "Paris"}'
MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-20250514",
    "text-embedding-3-small",
    "fail-500",
    "fail-429",
    "fail-401",
    "fail-400",
    "fail-midstream",
    "slow-1000",
    "hang",
)
EMBEDDING_DIMENSIONS = 8
SECRET_IN_ERRORS = "sk-secret-provider-key"
URL_IN_ERRORS = "https://internal.example/x"
GENERATION_ROUTES = {
    "/chat/completions": "chat",
    "/messages": "messages",
    "/responses": "responses",
    "/embeddings": "embeddings",
}
_MAX_TOKEN_FIELDS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "messages": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
_SSE_TYPE = "text/event-stream; charset=utf-8"
_MAX_HEAD = 64 * 1024
_ids = itertools.count(1)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):016d}"


# ------------------------------------------------------------------------------- token counting


def _text_chars(content: object) -> int:
    """Characters of prompt text: strings, and the text/input_text/content of content parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += len(part)
        elif isinstance(part, dict):
            for key in ("text", "input_text", "content"):
                value = part.get(key)
                if isinstance(value, str):
                    total += len(value)
                elif isinstance(value, list):
                    total += _text_chars(value)
    return total


def prompt_tokens(body: dict[str, Any], api: str) -> int:
    """Uncached prompt tokens the fake reports for a request body (api: chat/messages/responses)."""
    chars = 0
    if api == "responses":
        chars += _text_chars(body.get("instructions"))
        items = body.get("input")
        if isinstance(items, str):
            chars += len(items)
        elif isinstance(items, list):
            chars += sum(_text_chars(i.get("content") if isinstance(i, dict) else i) for i in items)
    else:
        if api == "messages":
            chars += _text_chars(body.get("system"))
        messages = body.get("messages")
        if isinstance(messages, list):
            chars += sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
    return max(1, math.ceil(chars / 4))


# ------------------------------------------------------------------------- behaviour from model


@dataclass(frozen=True)
class _Behaviour:
    fail_status: int | None = None
    midstream: bool = False
    drop_after: int | None = None
    cut_stream: bool = False
    error_first: bool = False
    slow_s: float = 0.0
    hang: bool = False
    chunks: int | None = None
    delay_s: float | None = None
    no_usage: bool = False
    reset: bool = False
    stall: bool = False
    garbage: bool = False
    cached: int = 0
    cache_write: int = 0
    tools: bool = False
    sse_framing: bool = False

    @classmethod
    def from_model(cls, model: str) -> "_Behaviour":
        def number(name: str) -> int | None:
            match = re.search(rf"{name}-(\d+)", model)
            return int(match.group(1)) if match else None

        fail = number("fail")
        return cls(
            fail_status=fail if fail is not None and 400 <= fail <= 599 else None,
            midstream="fail-midstream" in model,
            drop_after=number("dropafter") or number("resetafter") or number("stallafter"),
            cut_stream="cutstream" in model,
            error_first="errorfirst" in model,
            slow_s=(number("slow") or 0) / 1000,
            hang="hang" in model,
            chunks=number("chunks"),
            delay_s=None if (d := number("delay")) is None else d / 1000,
            no_usage="nousage" in model,
            reset="resetafter" in model,
            stall="stallafter" in model,
            garbage="garbage" in model,
            cached=number("cached") or 0,
            cache_write=number("cachewrite") or 0,
            tools="tools" in model,
            sse_framing="sseframing" in model,
        )


# ------------------------------------------------------------------------------ payload builders


@dataclass
class _Gen:
    """Everything a builder needs: the request plus the decided chunks and token numbers."""

    model: str
    body: dict[str, Any]
    pieces: list[str]  # content chunks: words, or tool-argument fragments
    tools: bool
    truncated: bool
    prompt: int  # uncached prompt tokens
    cached: int
    cache_write: int
    usage_chunk: bool  # report usage (chat streams: send the trailing usage chunk)


@dataclass
class _Stream:
    """SSE events split so that dropafter-<n> can cut right after n content chunks."""

    preamble: list[str]
    content: list[str]
    tail: list[str]

    def events(self) -> list[str]:
        return [*self.preamble, *self.content, *self.tail]


def _sse(data: object, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else _dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _build_chat(g: _Gen, stream: bool) -> dict[str, Any] | _Stream:
    rid, created, n = _new_id("chatcmpl-fake"), int(time.time()), len(g.pieces)
    finish = "tool_calls" if g.tools else "length" if g.truncated else "stop"
    usage = {
        "prompt_tokens": g.prompt + g.cached,
        "completion_tokens": n,
        "total_tokens": g.prompt + g.cached + n,
        "prompt_tokens_details": {"cached_tokens": g.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    call = {
        "id": _new_id("call_fake"),
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS},
    }
    envelope = {
        "id": rid,
        "created": created,
        "model": g.model,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    if not stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if g.tools else "".join(g.pieces),
            "refusal": None,
            "annotations": [],
        }
        if g.tools:
            message["tool_calls"] = [call]
        return {
            **envelope,
            "object": "chat.completion",
            **({"usage": usage} if g.usage_chunk else {}),
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
        }
    options = g.body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        obj = {
            **envelope,
            "object": "chat.completion.chunk",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:  # the real API sends "usage": null on every chunk in this mode
            obj["usage"] = None
        return _sse(obj)

    if g.tools:
        header = {**call, "index": 0, "function": {"name": TOOL_NAME, "arguments": ""}}
        first = chunk({"role": "assistant", "content": None, "tool_calls": [header]})
        content = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in g.pieces
        ]
    else:
        first = chunk({"role": "assistant", "content": "", "refusal": None})
        content = [chunk({"content": p}) for p in g.pieces]
    tail = [chunk({}, finish)]
    if include_usage and g.usage_chunk:
        tail.append(
            _sse({**envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    tail.append(_sse("[DONE]"))
    return _Stream([first], content, tail)


def _build_messages(g: _Gen, stream: bool) -> dict[str, Any] | _Stream:
    n = len(g.pieces)
    stop = "tool_use" if g.tools else "max_tokens" if g.truncated else "end_turn"
    usage = {
        "input_tokens": g.prompt,
        "cache_creation_input_tokens": g.cache_write,
        "cache_read_input_tokens": g.cached,
        "output_tokens": n,
    }
    block: dict[str, Any] = (
        {
            "type": "tool_use",
            "id": _new_id("toolu_fake"),
            "name": TOOL_NAME,
            "input": json.loads(TOOL_ARGUMENTS),
        }
        if g.tools
        else {"type": "text", "text": "".join(g.pieces)}
    )
    message = {
        "id": _new_id("msg_fake"),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [block],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    if not g.usage_chunk:
        del message["usage"]
    if not stream:
        return message
    started = {**message, "content": [], "stop_reason": None}
    if g.usage_chunk:
        started["usage"] = {**usage, "output_tokens": 1}
    empty_block = {**block, "input": {}} if g.tools else {"type": "text", "text": ""}
    preamble = [
        _sse({"type": "message_start", "message": started}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": empty_block},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    kind, key = ("input_json_delta", "partial_json") if g.tools else ("text_delta", "text")
    content = [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": kind, key: p}},
            "content_block_delta",
        )
        for p in g.pieces
    ]
    tail = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                **({"usage": {"output_tokens": n}} if g.usage_chunk else {}),
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return _Stream(preamble, content, tail)


def _build_responses(g: _Gen, stream: bool) -> dict[str, Any] | _Stream:
    k, created, n = next(_ids), int(time.time()), len(g.pieces)
    status = "incomplete" if g.truncated else "completed"
    prompt = g.prompt + g.cached
    usage: dict[str, Any] | None = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": g.cached},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + n,
    }
    if not g.usage_chunk:
        usage = None
    text = "".join(g.pieces)
    part = {"type": "output_text", "text": text, "annotations": []}
    item: dict[str, Any]
    if g.tools:
        item_id = f"fc_fake{k:016d}"
        item = {
            "type": "function_call",
            "id": item_id,
            "call_id": f"call_fake{k:016d}",
            "name": TOOL_NAME,
            "arguments": TOOL_ARGUMENTS,
            "status": "completed",
        }
    else:
        item_id = f"msg_fake{k:016d}"
        item = {
            "type": "message",
            "id": item_id,
            "status": status,
            "role": "assistant",
            "content": [part],
        }

    def response(state: str, output: list[Any], use: dict[str, Any] | None) -> dict[str, Any]:
        b = g.body
        return {
            "id": f"resp_fake{k:016d}",
            "object": "response",
            "created_at": created,
            "status": state,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if state == "incomplete" else None
            ),
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "model": g.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": b.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": b.get("store", True),
            "temperature": b.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": b.get("tools") or [],
            "top_p": b.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": use,
            "user": b.get("user"),
            "metadata": b.get("metadata") or {},
        }

    if not stream:
        return response(status, [item], usage)
    seq = itertools.count()  # sequence numbers follow emission order: preamble, content, tail

    def ev(kind: str, **fields: Any) -> str:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    at = {"item_id": item_id, "output_index": 0}
    preamble = [
        ev("response.created", response=response("in_progress", [], None)),
        ev("response.in_progress", response=response("in_progress", [], None)),
    ]
    if g.tools:
        preamble.append(
            ev(
                "response.output_item.added",
                output_index=0,
                item={**item, "arguments": "", "status": "in_progress"},
            )
        )
        content = [ev("response.function_call_arguments.delta", **at, delta=p) for p in g.pieces]
        tail = [
            ev(
                "response.function_call_arguments.done",
                **at,
                name=TOOL_NAME,
                arguments=TOOL_ARGUMENTS,
            )
        ]
    else:
        preamble.append(
            ev(
                "response.output_item.added",
                output_index=0,
                item={**item, "status": "in_progress", "content": []},
            )
        )
        preamble.append(
            ev("response.content_part.added", **at, content_index=0, part={**part, "text": ""})
        )
        content = [
            ev("response.output_text.delta", **at, content_index=0, delta=p, logprobs=[])
            for p in g.pieces
        ]
        tail = [
            ev("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
            ev("response.content_part.done", **at, content_index=0, part=part),
        ]
    tail.append(ev("response.output_item.done", output_index=0, item=item))
    tail.append(ev(f"response.{status}", response=response(status, [item], usage)))
    return _Stream(preamble, content, tail)


def _vector(key: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from the input text."""
    digest = hashlib.shake_256(key.encode()).digest(2 * dims)
    raw = [(int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 32767.5) - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _build_embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    raw = body.get("input")
    # One input is a string or a list of token ids; anything else is a list of inputs.
    single = isinstance(raw, str) or (
        isinstance(raw, list) and bool(raw) and all(isinstance(t, int) for t in raw)
    )
    inputs: list[Any] = [raw] if single else list(raw) if isinstance(raw, list) else []
    dims = body.get("dimensions")
    if not isinstance(dims, int) or not 0 < dims <= 4096:
        dims = EMBEDDING_DIMENSIONS
    chars = sum(len(i) for i in inputs if isinstance(i, str))
    token_ids = sum(len(i) for i in inputs if isinstance(i, list))
    data = []
    for index, item in enumerate(inputs):
        vec = _vector(item if isinstance(item, str) else _dumps(item), dims)
        embedding: list[float] | str = vec
        if body.get("encoding_format") == "base64":  # little-endian float32, like the real API
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = max(1, math.ceil(chars / 4) + token_ids)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# What a broken server or proxy might send in place of events: broken JSON, bytes that are
# not UTF-8, a line with no field, JSON that is no event of any API.
GARBAGE_EVENTS = [
    'data: {"choices": [{"delta": {"content": "unterminated\n\n',
    "data: \udcff\udcfe not utf-8\n\n",
    "this line has no field\n\n",
    'data: [1, 2, "not an event"]\n\n',
]
GARBAGE_BODY = b"<html>502 Bad Gateway from a proxy\xff\xfe</html>"

_BUILDERS: dict[str, Callable[[_Gen, bool], dict[str, Any] | _Stream]] = {
    "chat": _build_chat,
    "messages": _build_messages,
    "responses": _build_responses,
}

# status -> (OpenAI error type, OpenAI error code, Anthropic error type)
_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "invalid_request_error"),
    401: ("invalid_request_error", "invalid_api_key", "authentication_error"),
    403: ("invalid_request_error", "permission_denied", "permission_error"),
    404: ("invalid_request_error", "model_not_found", "not_found_error"),
    422: ("invalid_request_error", None, "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded", "rate_limit_error"),
    500: ("server_error", None, "api_error"),
    503: ("server_error", None, "overloaded_error"),
}


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


# ------------------------------------------------------------------------------ replies and HTTP


@dataclass
class _Reply:
    status: int = 200
    body: Any = None  # JSON document, when events is None
    events: list[str] | None = None  # SSE events of a streamed reply
    headers: dict[str, str] = field(default_factory=dict)
    delay_before: float = 0.0
    event_delay: float = 0.0
    hang: bool = False
    abort_after: int | None = None  # stream: send this many events, then drop the connection
    cut_body: bool = False  # JSON: send half the body, then drop the connection
    text: str | None = None  # a text/plain body instead of `body`
    reset: bool = False  # the drop above is a TCP reset (RST), not a close (FIN)
    stall: bool = False  # instead of the drop above, send nothing more, ever
    raw_body: bytes | None = None  # a JSON reply's bytes as they are (not JSON at all)


def _error(api: str, status: int, message: str | None = None) -> _Reply:
    oa_type, oa_code, an_type = _ERROR_KINDS.get(
        status,
        ("invalid_request_error", None, "invalid_request_error")
        if status < 500
        else ("server_error", None, "api_error"),
    )
    if message is None:
        message = (
            f"fake upstream: invalid request (provider key {SECRET_IN_ERRORS} rejected, "
            f"see {URL_IN_ERRORS})"
            if status == 400
            else f"fake upstream: injected {status} {_phrase(status)}"
        )
    body: dict[str, Any] = (
        {"type": "error", "error": {"type": an_type, "message": message}}
        if api == "messages"
        else {"error": {"message": message, "type": oa_type, "param": None, "code": oa_code}}
    )
    return _Reply(status, body, headers={"retry-after": "1"} if status == 429 else {})


def _head(
    status: int, ctype: str, length: int | None, headers: dict[str, str], keep_alive: bool
) -> bytes:
    request_id = _new_id("req_fake")  # OpenAI SDKs read x-request-id, Anthropic's request-id
    lines = [
        f"HTTP/1.1 {status} {_phrase(status)}",
        f"content-type: {ctype}",
        f"x-request-id: {request_id}",
        f"request-id: {request_id}",
    ]
    if length is None:
        lines += ["transfer-encoding: chunked", "cache-control: no-cache"]
    else:
        lines.append(f"content-length: {length}")
    if not keep_alive:
        lines.append("connection: close")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _frame(event: str) -> bytes:
    # surrogateescape: GARBAGE_EVENTS spell raw bytes that are not UTF-8 as "\udcXX".
    data = event.encode("utf-8", "surrogateescape")
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: Any  # parsed JSON, or None when empty or not JSON
    raw: bytes

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


class _BadRequest(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One client connection; a task per connection reads requests and writes replies.

    A Protocol (rather than asyncio streams) lets us see the peer's EOF the moment it happens,
    even while we are not reading: that is how hang/slow/delay notice an abandoning client.
    """

    def __init__(self, owner: "FakeProvider") -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.readable = asyncio.Event()
        self.gone = asyncio.Event()  # peer sent EOF or the connection was lost
        self.drained = asyncio.Event()
        self.drained.set()
        self.task: asyncio.Task[None] | None = None

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Any buffered byte pauses us, so _drain() can wait until everything reached the kernel
        # before a deliberate abort (otherwise abort() would discard unsent events).
        self.transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner._opened(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.readable.set()

    def eof_received(self) -> bool:
        self.gone.set()
        self.readable.set()
        return True  # keep our side open; _serve closes it when it is done

    def connection_lost(self, exc: Exception | None) -> None:
        for event in (self.gone, self.readable, self.drained):
            event.set()
        self.owner._closed(self)

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    # ---- reading
    async def _more(self) -> bool:
        """Wait for more input; False once the peer has stopped sending."""
        if self.gone.is_set():
            return False
        self.readable.clear()
        await self.readable.wait()
        return True

    async def _read_until(self, sep: bytes) -> bytes | None:
        while (end := self.buffer.find(sep)) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise _BadRequest("request head or chunk line too long")
            if not await self._more():
                return None
        data = bytes(self.buffer[: end + len(sep)])
        del self.buffer[: end + len(sep)]
        return data

    async def _read_exact(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._more():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def _read_chunked(self) -> bytes | None:
        body = bytearray()
        while True:
            line = await self._read_until(b"\r\n")
            if line is None:
                return None
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:  # skip trailers up to the blank line
                while (trailer := await self._read_until(b"\r\n")) != b"\r\n":
                    if trailer is None:
                        return None
                return bytes(body)
            data = await self._read_exact(size + 2)
            if data is None:
                return None
            body += data[:-2]

    async def _read_request(self) -> tuple[RecordedRequest, bool] | None:
        head = await self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"malformed request line {request_line!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"malformed header {line!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        connection = headers.get("connection", "").lower()
        keep_alive = (
            "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        )
        if headers.get("expect", "").lower() == "100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw = await self._read_chunked()
        else:
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                raise _BadRequest("bad content-length") from None
            raw = await self._read_exact(length)
        if raw is None:
            return None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path, _, query = target.partition("?")
        return RecordedRequest(method, path, query, headers, body, raw), keep_alive

    # ---- writing
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, but wake early if the client leaves; True if it is still there."""
        try:
            await asyncio.wait_for(self.gone.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _drop(self, reply: _Reply) -> bool:
        """Deliberate abrupt end after what we wrote was flushed: a close without the final
        chunk, a reset (RST), or a stall (nothing more until the client goes). False: the
        connection serves nothing more."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), 5)
        if reply.stall:
            await self.gone.wait()
            self.owner._abandoned()
            return False
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if reply.reset and sock is not None:
                # Linger on, timeout 0: closing sends a RST instead of a FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        return False

    async def _send(self, reply: _Reply, keep_alive: bool) -> bool:
        """Write one reply; True if the connection can serve another request."""
        if reply.hang:
            await self.gone.wait()
            self.owner._abandoned()
            return False
        if reply.delay_before > 0 and not await self._pause(reply.delay_before):
            self.owner._abandoned()
            return False
        if reply.events is None:
            if reply.raw_body is not None:
                ctype, body = "application/json", reply.raw_body
            elif reply.text is not None:
                ctype, body = "text/plain; charset=utf-8", reply.text.encode()
            else:
                ctype, body = "application/json", _dumps(reply.body).encode()
            head = _head(reply.status, ctype, len(body), reply.headers, keep_alive)
            if reply.cut_body:
                self._write(head + body[: len(body) // 2])
                return await self._drop(reply)
            self._write(head + body)
            return keep_alive
        events = reply.events[: reply.abort_after]  # [:None] keeps them all
        head = _head(reply.status, _SSE_TYPE, None, reply.headers, keep_alive)
        end = b"" if reply.abort_after is not None else b"0\r\n\r\n"
        if self.gone.is_set():
            self.owner._abandoned()
            return False
        if reply.event_delay <= 0:
            self._write(head + b"".join(_frame(e) for e in events) + end)
        else:
            self._write(head)
            for i, event in enumerate(events):
                if i and not await self._pause(reply.event_delay):
                    self.owner._abandoned()
                    return False
                self._write(_frame(event))
            self._write(end)
        if reply.abort_after is not None:
            return await self._drop(reply)
        return keep_alive

    async def _serve(self) -> None:
        try:
            while True:
                try:
                    parsed = await self._read_request()
                except _BadRequest as exc:
                    reply = _Reply(
                        400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
                    )
                    await self._send(reply, keep_alive=False)
                    break
                if parsed is None:
                    break
                request, keep_alive = parsed
                try:
                    reply = self.owner._respond(request)
                except Exception as exc:  # a bug in the fake: make it visible to the test
                    logger.exception("fake provider failed on %s %s", request.method, request.path)
                    reply = _Reply(
                        500,
                        {
                            "error": {
                                "message": f"fake provider bug: {exc!r}",
                                "type": "fake_provider_bug",
                            }
                        },
                    )
                if not await self._send(reply, keep_alive):
                    break
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()


# ------------------------------------------------------------------------------------ the server


class FakeProvider:
    """The fake provider; see the module docstring for endpoints and the model vocabulary.

    All counters and records are safe to read from the test thread while the server runs.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        chunks: int = 20,
        latency_ms: float = 0.0,
        chunk_delay_ms: float = 0.0,
        require_key: str | None = None,
    ) -> None:
        self.host = host
        self.chunks = chunks
        self.latency_s = latency_ms / 1000
        self.chunk_delay_s = chunk_delay_ms / 1000
        self.require_key = require_key
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()
        self._hits_by_path: dict[str, int] = {}
        self._requests: list[RecordedRequest] = []
        self._aborted = 0
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> Self:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Connection(self), self.host, self._requested_port)
                )
                self._port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._thread = self._loop = self._server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in list(self._connections) if c.task is not None]
        for task in tasks:
            task.cancel()  # cancel first, so closing a hung connection is not an "abandon"
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeProvider is not started")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the Anthropic SDK's base_url)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (the OpenAI SDK's base_url)."""
        return f"{self.root_url}/v1"

    # ---- observability
    @property
    def hits(self) -> int:
        """POSTs received on chat/messages/responses/embeddings, whatever the outcome."""
        with self._lock:
            return sum(self._hits_by_path.values())

    @property
    def hits_by_path(self) -> dict[str, int]:
        """Like ``hits``, keyed by the path as requested (e.g. ``/v1/chat/completions``)."""
        with self._lock:
            return dict(self._hits_by_path)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (except /_fake/*), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest | None:
        with self._lock:
            return self._requests[-1] if self._requests else None

    @property
    def aborted_by_client(self) -> int:
        """Replies the client walked away from before they were complete (stream or wait)."""
        with self._lock:
            return self._aborted

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def reset(self) -> None:
        """Forget hits, recorded requests and aborts (open connections are live state)."""
        with self._lock:
            self._hits_by_path.clear()
            self._requests.clear()
            self._aborted = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "hits": sum(self._hits_by_path.values()),
                "hits_by_path": dict(self._hits_by_path),
                "requests": len(self._requests),
                "aborted_by_client": self._aborted,
                "open_connections": len(self._connections),
            }

    @staticmethod
    def wait_for(
        predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01
    ) -> bool:
        """Poll ``predicate`` until it is truthy; False if ``timeout`` seconds pass first.

        On SQLite's shared in-memory test database a read from the test's thread can meet
        the gateway's write lock ("database table is locked"): that is "not yet"."""
        from django.db import OperationalError

        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return True
            except OperationalError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # ---- called on the loop thread
    def _opened(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.add(conn)

    def _closed(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _abandoned(self) -> None:
        with self._lock:
            self._aborted += 1

    def _respond(self, request: RecordedRequest) -> _Reply:
        path = request.path.rstrip("/") or "/"
        route = path[3:] if path.startswith("/v1/") else path
        if route.startswith("/_fake/"):
            if route == "/_fake/reset" and request.method == "POST":
                self.reset()
            return _Reply(body=self.stats())
        with self._lock:
            self._requests.append(request)
        api = GENERATION_ROUTES.get(route)
        if request.method == "GET":
            return self._respond_get(route)
        if api is None or request.method != "POST":
            status = 404 if api is None else 405
            return _error("chat", status, f"fake upstream: no route {request.method} {path}")
        with self._lock:
            self._hits_by_path[request.path] = self._hits_by_path.get(request.path, 0) + 1
        if self.require_key is not None and _presented_key(request.headers) != self.require_key:
            return _error(api, 401, "fake upstream: invalid API key")
        if not isinstance(request.body, dict):
            return _error(api, 400)
        model = str(request.body.get("model") or "gpt-4o-mini")
        behaviour = _Behaviour.from_model(model)
        stream = bool(request.body.get("stream"))
        if "echokey" in model and "latefail" in model and stream and api in _MAX_TOKEN_FIELDS:
            # The answer starts, then the stream reports an error that echoes the key.
            reply = self._generate(api, request.body, model, behaviour)
            reply.events = [*reply.events[:3], _echo_event(api, _echo_message(request))]
            return reply
        if "echokey" in model:
            return _echo_key(api, request, behaviour, stream=stream)
        reply = self._generate(api, request.body, model, behaviour)
        reply.delay_before = self.latency_s + behaviour.slow_s
        return reply

    def _respond_get(self, route: str) -> _Reply:
        if route == "/models":
            return _Reply(body={"object": "list", "data": [_model_entry(m) for m in MODELS]})
        if route.startswith("/models/"):
            return _Reply(body=_model_entry(route.removeprefix("/models/")))
        if route in ("/", "/health"):
            return _Reply(body={"status": "ok"})
        return _error("chat", 404, f"fake upstream: no route GET {route}")

    def _generate(self, api: str, body: dict[str, Any], model: str, b: _Behaviour) -> _Reply:
        if b.hang:
            return _Reply(hang=True)
        if b.fail_status is not None:
            return _error(api, b.fail_status)
        drop = b.midstream or b.drop_after is not None or b.cut_stream
        if api == "embeddings":
            return _Reply(body=_build_embeddings(body, model), cut_body=drop)
        stream = bool(body.get("stream"))
        if b.garbage and not stream:
            return _Reply(raw_body=GARBAGE_BODY)
        n = self.chunks if b.chunks is None else b.chunks
        truncated = False
        if not b.tools:  # a tool call is all or nothing: caps do not cut it
            cap = next(
                (
                    v
                    for f in _MAX_TOKEN_FIELDS[api]
                    if isinstance(v := body.get(f), int) and not isinstance(v, bool) and v > 0
                ),
                None,
            )
            if cap is not None and cap < n:
                n, truncated = cap, True
        if b.tools:
            pieces = list(TOOL_ARGUMENT_PIECES)
        else:
            pieces = [WORDS[i % len(WORDS)] for i in range(n)]
        gen = _Gen(
            model,
            body,
            pieces,
            b.tools,
            truncated,
            prompt_tokens(body, api),
            b.cached,
            b.cache_write,
            usage_chunk=not b.no_usage,
        )
        built = _BUILDERS[api](gen, stream)
        if not isinstance(built, _Stream):
            return _Reply(body=built, cut_body=drop, reset=b.reset, stall=b.stall)
        events = built.events()
        if b.error_first:
            events = [_stream_error_event(api)]
        elif b.garbage:
            events = [*built.preamble, *built.content, *GARBAGE_EVENTS]
        if b.sse_framing:
            events = [
                (": keep-alive\n\n" + event + ("\n" if i % 3 == 2 else "")).replace("\n", "\r\n")
                for i, event in enumerate(events)
            ]
        reply = _Reply(
            events=events,
            event_delay=self.chunk_delay_s if b.delay_s is None else b.delay_s,
            reset=b.reset,
            stall=b.stall,
        )
        if b.cut_stream:
            reply.abort_after = 0
        elif b.midstream:
            reply.abort_after = max(1, len(events) // 2)
        elif b.drop_after is not None:
            reply.abort_after = len(built.preamble) + min(b.drop_after, len(built.content))
        return reply


def _stream_error_event(api: str) -> str:
    """A failure reported inside a 200 stream, as each API's servers send it."""
    message = "fake upstream: the model is overloaded"
    if api == "messages":
        return _sse(
            {"type": "error", "error": {"type": "overloaded_error", "message": message}}, "error"
        )
    if api == "responses":
        return _sse(
            {
                "type": "error",
                "sequence_number": 0,
                "code": "server_error",
                "message": message,
                "param": None,
            },
            "error",
        )
    return _sse({"error": {"message": message, "type": "server_error", "code": None}})


def _echo_message(request: RecordedRequest) -> str:
    authorization = request.headers.get("authorization", "")
    api_key = request.headers.get("x-api-key", "")
    return (
        f"Incorrect API key provided: {_presented_key(request.headers)}. "
        f"You sent Authorization: {authorization!r} and x-api-key: {api_key!r}"
    )


def _echo_event(api: str, message: str) -> str:
    """The API's in-stream error event, saying `message`."""
    error = json.loads(_stream_error_event(api).split("data: ", 1)[1])
    (error if api == "responses" else error["error"])["message"] = message
    return _sse(error, "error" if api in ("messages", "responses") else None)


def _echo_key(api: str, request: RecordedRequest, b: _Behaviour, *, stream: bool) -> _Reply:
    """An error that repeats the credential the fake was sent (model `echokey`)."""
    message = _echo_message(request)
    echo = {
        "x-echo-authorization": request.headers.get("authorization")
        or request.headers.get("x-api-key", "")
    }
    status = b.fail_status or 401
    if b.error_first and stream and api != "embeddings":
        return _Reply(events=[_echo_event(api, message)], headers=echo)
    if "plain" in request.body.get("model", ""):
        return _Reply(status, text=f"{_phrase(status)}\n{message}\n", headers=echo)
    reply = _error(api, status, message)
    reply.headers.update(echo)
    return reply


def _presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake LLM provider for gateway tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="wait before first byte")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between events")
    parser.add_argument(
        "--require-key", default=None, help="401 unless Authorization: Bearer KEY or x-api-key: KEY"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with FakeProvider(
        args.port,
        host=args.host,
        chunks=args.chunks,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        require_key=args.require_key,
    ) as fake:
        print(f"fake provider listening on {fake.base_url}", flush=True)  # noqa: T201
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
