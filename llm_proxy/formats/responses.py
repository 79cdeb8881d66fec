"""OpenAI Responses (`POST /v1/responses`)."""

from __future__ import annotations

import re
from typing import Any

from llm_proxy.formats.base import (
    ApiFormat,
    CodecState,
    delta_members,
    require,
    require_output_cap,
    usage_cached_inside,
)
from llm_proxy.pipeline.sse import PassThroughCodec, SSEEvent, event_type, format_event
from usage.pricing import TokenUsage

KEEPALIVE = b": keepalive\n\n"
# Terminal events: the answer is finished (completed, or cut short by a cap or a filter).
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})
_DELTA_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_.]+)"')
# What a responses stream's codec reads event by event: the terminal events (usage) and
# errors, by their `event:` line or their data's type.
_SPECIAL = re.compile(
    rb"response\.(?:completed|incomplete|failed)|event:\s*error|"
    rb'"type"\s*:\s*"error"|' + PassThroughCodec.FRAMING
)


_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
MESSAGE_ROLES = ("user", "assistant", "system", "developer")


def usage_from_responses(usage: Any) -> TokenUsage | None:
    return usage_cached_inside(usage, input_field="input_tokens", output_field="output_tokens")


def error_event(sequence_number: int) -> bytes:
    """The Responses stream's `error` event (what the openai SDK parses as
    ResponseErrorEvent)."""
    return format_event(
        {
            "type": "error",
            "code": "server_error",
            "message": "An error occurred during streaming",
            "param": None,
            "sequence_number": sequence_number,
        },
        "error",
    )


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return texts


def _validate_item(item: Any, call_ids: set[str], stateful: bool) -> None:
    require(isinstance(item, dict), "each input item must be an object", "input")
    kind = item.get("type", "message")
    require(isinstance(kind, str), "input item type must be a string", "input")
    if kind == "message":
        require(
            item.get("role") in MESSAGE_ROLES,
            "input messages need a role of user, assistant, system or developer",
            "input",
        )
        content = item.get("content")
        require(
            isinstance(content, str)
            or (
                isinstance(content, list)
                and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
            ),
            "input message content must be a string or an array of typed parts",
            "input",
        )
    elif kind == "function_call":
        require(
            isinstance(item.get("call_id"), str) and isinstance(item.get("name"), str),
            "function_call items need a call_id and a name",
            "input",
        )
        call_ids.add(item["call_id"])
    elif kind == "function_call_output":
        call_id = item.get("call_id")
        require(isinstance(call_id, str), "function_call_output items need a call_id", "input")
        output = item.get("output")
        require(
            output is None
            or isinstance(output, str)
            or (
                isinstance(output, list)
                and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in output)
            ),
            "function_call_output output must be a string or an array of typed parts",
            "input",
        )
        # With stored state (previous_response_id, conversation) the call may be there.
        require(
            stateful or call_id in call_ids,
            f"function_call_output refers to call_id '{call_id}', which no earlier "
            "function_call in input contains",
            "input",
        )


class ResponsesFormat(ApiFormat):
    name = "responses"
    endpoint = "/v1/responses"
    error_style = "openai"
    max_output_fields = ("max_output_tokens",)

    def validate(self, body: dict[str, Any]) -> None:
        stateful = bool(body.get("previous_response_id") or body.get("conversation"))
        source = body.get("input")
        require(
            source is not None or stateful or body.get("prompt") is not None,
            "input is required",
            "input",
        )
        require(
            source is None or isinstance(source, str | list),
            "input must be a string or an array of items",
            "input",
        )
        call_ids: set[str] = set()
        for item in source if isinstance(source, list) else ():
            _validate_item(item, call_ids, stateful)
        require(
            body.get("instructions") is None or isinstance(body["instructions"], str),
            "instructions must be a string",
            "instructions",
        )
        require(isinstance(body.get("stream", False), bool), "stream must be a boolean", "stream")
        # A background response finishes after this request has returned, out of the
        # gateway's sight: it could be neither metered nor charged.
        require(
            body.get("background") in (None, False),
            "background responses are not supported by the gateway",
            "background",
        )
        require_output_cap(body, "max_output_tokens")
        tools = body.get("tools")
        require(
            tools is None
            or (
                isinstance(tools, list)
                and all(isinstance(t, dict) and isinstance(t.get("type"), str) for t in tools)
            ),
            "tools must be an array of objects with a type",
            "tools",
        )

    def prompt_texts(self, body: dict[str, Any]) -> list[str]:
        texts: list[str] = []
        if isinstance(body.get("instructions"), str):
            texts.append(body["instructions"])
        source = body.get("input")
        if isinstance(source, str):
            texts.append(source)
        for item in source if isinstance(source, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("type", "message") == "message":
                texts.extend(_content_texts(item.get("content")))
            elif item.get("type") == "function_call_output":
                texts.extend(_content_texts(item.get("output")))
        return texts

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        return usage_from_responses(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        total = 0
        for item in body.get("output") or ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                total += sum(len(text) for text in _content_texts(item.get("content")))
            elif item.get("type") == "function_call" and isinstance(item.get("arguments"), str):
                total += len(item["arguments"])
        return total

    def stream_codec(self, request: dict[str, Any]) -> ResponsesStreamCodec:
        return ResponsesStreamCodec()

    def is_stream_error(self, event: SSEEvent) -> bool:
        return event_type(event, _TYPE) in ("error", "response.failed")


class ResponsesStreamCodec(CodecState):
    """Responses events pass through unchanged; the terminal `response.completed` (or
    `response.incomplete`) is held back for settlement.

    Only the terminal event is parsed (for usage); deltas are kept as bytes and parsed
    only if the stream breaks and what was delivered must be priced.
    """

    keepalive = KEEPALIVE
    special = _SPECIAL

    def __init__(self) -> None:
        super().__init__()
        self._terminal = b""
        # The last event seen (its sequence number numbers the error event).
        self._last = b""

    @property
    def complete(self) -> bool:
        return self.finished and not self.failed

    def forwarded(self, events: bytes) -> None:
        boundary = events.rfind(b"\n\n", 0, -2)
        self._last = events[boundary + 2 :] if boundary >= 0 else events

    def transform(self, event: SSEEvent) -> bytes:
        name = event_type(event, _TYPE)
        self._last = event.raw
        if name in TERMINAL_EVENTS or name == "response.failed":
            data = event.json() or {}
            response = data.get("response")
            if isinstance(response, dict):
                self.usage = usage_from_responses(response.get("usage")) or self.usage
            self.finished = True
            if name == "response.failed":
                # Like a broken stream: charged what was delivered, told in error_event().
                self.failed = True
            else:
                self._terminal = event.raw
            return b""
        elif name == "error":
            return self._upstream_failed()
        return self.deliver(event)

    def closing(self) -> bytes:
        return self._terminal

    def error_event(self) -> bytes:
        match = _SEQUENCE.search(self._last)
        return error_event(int(match.group(1)) + 1 if match else 0)

    def output_chars(self) -> int:
        deltas = [
            event for event in self.delivered_events() if event_type(event, _TYPE) in _DELTA_EVENTS
        ]
        return sum(len(delta) for delta in delta_members(deltas) if isinstance(delta, str))
