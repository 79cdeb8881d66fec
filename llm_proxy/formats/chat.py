"""OpenAI Chat Completions (`POST /v1/chat/completions`)."""

from __future__ import annotations

import re
from typing import Any

from llm_proxy.formats.base import (
    ApiFormat,
    CodecState,
    require,
    require_output_cap,
    text_length,
    usage_cached_inside,
)
from llm_proxy.pipeline.sse import PassThroughCodec, SSEEvent, format_event
from usage.pricing import TokenUsage

# Cheap byte-level checks, so that only the chunks that matter are parsed as JSON.
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"')
_DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_ERROR = re.compile(rb'\s*\{\s*"error"\s*:')
# What a chat stream's codec reads event by event: [DONE], an error object, a usage
# object (every chunk of a stream with usage carries `"usage":null` until the last).
_SPECIAL = re.compile(rb'\[DONE\]|"error"\s*:|"usage"\s*:\s*\{|' + PassThroughCodec.FRAMING)


def usage_from_chat(usage: Any) -> TokenUsage | None:
    return usage_cached_inside(usage, input_field="prompt_tokens", output_field="completion_tokens")


def usage_requested(body: dict[str, Any]) -> bool:
    """The client asked for the usage-only chunk at the end of its stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _message_output_chars(message: Any) -> int:
    if not isinstance(message, dict):
        return 0
    total = text_length(message.get("content"))
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            arguments = call["function"].get("arguments")
            total += len(arguments) if isinstance(arguments, str) else 0
    return total


def _validate_message(message: dict[str, Any], call_ids: set[str]) -> None:
    """A message's content parts are typed objects, and every tool message answers a
    tool call made earlier in the conversation."""
    content = message.get("content")
    require(
        content is None
        or isinstance(content, str)
        or (
            isinstance(content, list)
            and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
        ),
        "message content must be a string or an array of typed parts",
        "messages",
    )
    calls = message.get("tool_calls")
    if message["role"] == "assistant" and calls is not None:
        require(
            isinstance(calls, list)
            and all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in calls),
            "tool_calls must be an array of objects with an id",
            "messages",
        )
        call_ids.update(call["id"] for call in calls)
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        require(isinstance(call_id, str), "tool messages need a tool_call_id", "messages")
        require(
            call_id in call_ids,
            f"tool message refers to tool_call_id '{call_id}', which no earlier assistant "
            "message contains",
            "messages",
        )


class ChatFormat(ApiFormat):
    name = "chat"
    endpoint = "/v1/chat/completions"
    error_style = "openai"
    max_output_fields = ("max_completion_tokens", "max_tokens")

    def validate(self, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        require(
            isinstance(messages, list) and bool(messages),
            "messages must be a non-empty array",
            "messages",
        )
        call_ids: set[str] = set()
        for message in messages:
            require(
                isinstance(message, dict) and isinstance(message.get("role"), str),
                "each message must be an object with a string role",
                "messages",
            )
            _validate_message(message, call_ids)
        require(isinstance(body.get("stream", False), bool), "stream must be a boolean", "stream")
        for field in self.max_output_fields:
            require_output_cap(body, field)

    def prompt_texts(self, body: dict[str, Any]) -> list[str]:
        texts: list[str] = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
        return texts

    def upstream_body(self, body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
        upstream = {**body, "model": model}
        options = body.get("stream_options")
        if stream and (options is None or isinstance(options, dict)):
            # Always, whatever the client asked: without it OpenAI sends no usage in a
            # stream, and the request could only be charged its estimate. The codec
            # forwards the usage chunk only to a client that asked for it.
            upstream["stream_options"] = {**(options or {}), "include_usage": True}
        return upstream

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        return usage_from_chat(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        return sum(
            _message_output_chars(choice.get("message"))
            for choice in body.get("choices") or ()
            if isinstance(choice, dict)
        )

    def stream_codec(self, request: dict[str, Any]) -> ChatStreamCodec:
        return ChatStreamCodec(include_usage=usage_requested(request))

    def is_stream_error(self, event: SSEEvent) -> bool:
        return bool(_ERROR.match(event.data))


class ChatStreamCodec(CodecState):
    """Chat chunks pass through unchanged; `data: [DONE]` is held back for settlement.

    The usage-only chunk (`choices: []`) is held back too, and sent before `[DONE]` only
    to a client that asked for it (`include_usage`): OpenAI sends it to no one else, and
    the SDKs' canonical loop (`chunk.choices[0].delta.content`) breaks on it.
    """

    keepalive = b": keepalive\n\n"
    special = _SPECIAL

    def __init__(self, *, include_usage: bool) -> None:
        super().__init__()
        self.include_usage = include_usage
        self._usage_chunk = b""
        self._saw_finish_reason = False

    @property
    def complete(self) -> bool:
        if self.failed:
            return False
        return self.finished or self._saw_finish_reason or self.usage is not None

    def forwarded(self, events: bytes) -> None:
        if not self._saw_finish_reason and _FINISH.search(events):
            self._saw_finish_reason = True

    def transform(self, event: SSEEvent) -> bytes:
        data = event.data
        if data == _DONE:
            self.finished = True
            return b""
        if _ERROR.match(data):
            # OpenAI reports a failure inside the stream as an error object (then
            # [DONE]).
            return self._upstream_failed()
        if _FINISH.search(data):
            self._saw_finish_reason = True
        if _USAGE.search(data):
            chunk = event.json()
            if chunk is not None:
                self.usage = usage_from_chat(chunk.get("usage")) or self.usage
                if chunk.get("choices") == []:
                    self._usage_chunk = event.raw
                    return b""
        return self.deliver(event)

    def closing(self) -> bytes:
        return (self._usage_chunk if self.include_usage else b"") + _DONE_EVENT

    def error_event(self) -> bytes:
        return (
            format_event(
                {"error": {"message": "An error occurred during streaming", "type": "server_error"}}
            )
            + _DONE_EVENT
        )

    def output_chars(self) -> int:
        total = 0
        for event in self.delivered_events():
            chunk = event.json()
            for choice in chunk.get("choices") or () if chunk is not None else ():
                if isinstance(choice, dict):
                    total += _message_output_chars(choice.get("delta"))
        return total
