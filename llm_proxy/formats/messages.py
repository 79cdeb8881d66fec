"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from llm_proxy.formats.base import (
    ApiFormat,
    CodecState,
    as_int,
    delta_members,
    require,
    require_output_cap,
)
from llm_proxy.pipeline.sse import PassThroughCodec, SSEEvent, event_type, format_event
from usage.pricing import TokenUsage

# Content block types of the Messages API. Anything else is refused here rather than
# by the provider, so that the refusal is the same on every route.
KNOWN_BLOCKS = frozenset(
    {
        "text",
        "image",
        "document",
        "search_result",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)
ROLES = ("user", "assistant")
ERROR_EVENT = format_event(
    {
        "type": "error",
        "error": {"type": "api_error", "message": "An error occurred during streaming"},
    },
    "error",
)
PING = format_event({"type": "ping"}, "ping")
MESSAGE_STOP = format_event({"type": "message_stop"}, "message_stop")
_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')
# What a messages stream's codec reads event by event: the message_* events (usage, the
# stop) and errors, by their `event:` line or their data's type.
_SPECIAL = re.compile(
    rb'message_(?:start|delta|stop)|event:\s*error|"type"\s*:\s*"error"|' + PassThroughCodec.FRAMING
)


def usage_from_messages(usage: Any) -> TokenUsage | None:
    """Anthropic reports cache reads and writes beside (not inside) input_tokens."""
    if not isinstance(usage, dict):
        return None
    return TokenUsage(
        input_tokens=as_int(usage.get("input_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
        cache_read_tokens=as_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=as_int(usage.get("cache_creation_input_tokens")),
    )


def usage_from_message_start(usage: Any) -> TokenUsage | None:
    """The usage a `message_start` announces: its input counts are final, but its
    output_tokens is a placeholder (1) until `message_delta` gives the real count, so
    it is not taken as output (a stream that breaks before then is priced on what it
    delivered)."""
    start = usage_from_messages(usage)
    if start is None:
        return None
    return TokenUsage(
        input_tokens=start.input_tokens,
        cache_read_tokens=start.cache_read_tokens,
        cache_write_tokens=start.cache_write_tokens,
    )


def merge_messages_usage(usage: TokenUsage | None, delta: Any) -> TokenUsage | None:
    """Apply a `message_delta`'s usage: its counts are cumulative and override those of
    `message_start`; a count it leaves out keeps its earlier value."""
    if not isinstance(delta, dict):
        return usage
    base = usage or TokenUsage()

    def pick(name: str, current: int) -> int:
        return as_int(delta[name]) if delta.get(name) is not None else current

    return TokenUsage(
        input_tokens=pick("input_tokens", base.input_tokens),
        output_tokens=pick("output_tokens", base.output_tokens),
        cache_read_tokens=pick("cache_read_input_tokens", base.cache_read_tokens),
        cache_write_tokens=pick("cache_creation_input_tokens", base.cache_write_tokens),
    )


def _block_texts(block: dict[str, Any]) -> list[str]:
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return [block["text"]]
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            return [content]
        if isinstance(content, list):
            return [
                item["text"]
                for item in content
                if isinstance(item, dict) and isinstance(item.get("text"), str)
            ]
    return []


def _add_texts(texts: list[str], content: Any) -> None:
    """Append the text of a system prompt or message content (a string, or a list of
    blocks) to `texts`."""
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                texts.extend(_block_texts(block))


def _validate_blocks(content: Any, role: str, tool_use_ids: set[str]) -> None:
    if isinstance(content, str):
        return
    require(
        isinstance(content, list),
        "messages: content must be a string or an array of content blocks",
        "messages",
    )
    for block in content:
        require(
            isinstance(block, dict) and isinstance(block.get("type"), str),
            "messages: each content block must be an object with a type",
            "messages",
        )
        kind = block["type"]
        require(kind in KNOWN_BLOCKS, f"messages: unknown content block type '{kind}'", "messages")
        if kind == "text":
            require(isinstance(block.get("text"), str), "text blocks need a text", "messages")
        elif kind == "image":
            require(isinstance(block.get("source"), dict), "image blocks need a source", "messages")
        elif kind == "tool_use":
            require(
                role == "assistant"
                and isinstance(block.get("id"), str)
                and isinstance(block.get("name"), str)
                and isinstance(block.get("input"), dict),
                "tool_use blocks belong to assistant turns and need an id, a name and an "
                "input object",
                "messages",
            )
            tool_use_ids.add(block["id"])
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            require(
                role == "user" and isinstance(call_id, str),
                "tool_result blocks belong to user turns and need a tool_use_id",
                "messages",
            )
            require(
                call_id in tool_use_ids,
                f"tool_result block refers to tool_use id '{call_id}', which no earlier "
                "assistant turn contains",
                "messages",
            )
            result = block.get("content")
            require(
                result is None or isinstance(result, str | list),
                "tool_result content must be a string or an array of content blocks",
                "messages",
            )
            if isinstance(result, list):
                _validate_blocks(result, "tool_result", tool_use_ids)


class MessagesFormat(ApiFormat):
    name = "messages"
    endpoint = "/v1/messages"
    error_style = "anthropic"
    max_output_fields = ("max_tokens",)

    def validate(self, body: dict[str, Any]) -> None:
        require_output_cap(body, "max_tokens", required=True)
        require(isinstance(body.get("stream", False), bool), "stream must be a boolean", "stream")
        self.validate_prompt(body)

    def validate_prompt(self, body: dict[str, Any]) -> None:
        """What count_tokens checks too: the conversation, the system prompt, tools."""
        messages = body.get("messages")
        require(
            isinstance(messages, list) and bool(messages),
            "messages must be a non-empty array",
            "messages",
        )
        tool_use_ids: set[str] = set()
        for message in messages:
            require(
                isinstance(message, dict) and message.get("role") in ROLES,
                "each message must be an object with role 'user' or 'assistant'",
                "messages",
            )
            require("content" in message, "each message needs content", "messages")
            _validate_blocks(message["content"], message["role"], tool_use_ids)
        system = body.get("system")
        require(
            system is None
            or isinstance(system, str)
            or (
                isinstance(system, list)
                and all(isinstance(b, dict) and b.get("type") == "text" for b in system)
            ),
            "system must be a string or an array of text blocks",
            "system",
        )
        if isinstance(system, list):
            _validate_blocks(system, "system", tool_use_ids)
        metadata = body.get("metadata")
        require(
            metadata is None or isinstance(metadata, dict), "metadata must be an object", "metadata"
        )
        user_id = (metadata or {}).get("user_id")
        require(
            user_id is None or isinstance(user_id, str),
            "metadata.user_id must be a string",
            "metadata",
        )
        tools = body.get("tools")
        require(
            tools is None
            or (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)),
            "tools must be an array of objects",
            "tools",
        )

    def prompt_texts(self, body: dict[str, Any]) -> list[str]:
        texts: list[str] = []
        _add_texts(texts, body.get("system"))
        for message in body.get("messages") or ():
            _add_texts(texts, message.get("content") if isinstance(message, dict) else None)
        return texts

    def count_tokens(self, body: dict[str, Any]) -> int:
        """The local estimate of `/v1/messages/count_tokens`: the admission estimate's
        one token per four characters, over the prompt and the tool definitions (which
        a real count includes and can dominate for agents)."""
        chars = self.prompt_chars(body)
        if body.get("tools"):
            chars += len(json.dumps(body["tools"], separators=(",", ":")))
        return math.ceil(chars / 4)

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        return usage_from_messages(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        total = 0
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                total += len(block["text"])
            elif block.get("type") == "tool_use":
                total += len(json.dumps(block.get("input") or {}))
        return total

    def stream_codec(self, request: dict[str, Any]) -> MessagesStreamCodec:
        return MessagesStreamCodec()

    def is_stream_error(self, event: SSEEvent) -> bool:
        return event_type(event, _TYPE) in ("error",)


class MessagesStreamCodec(CodecState):
    """Messages events pass through unchanged; `message_delta` (the final usage) and
    `message_stop` are held back for settlement, so that the delta can carry the cost.

    Only `message_start` and `message_delta` (one each per stream) are parsed, for usage;
    content deltas are kept as bytes and parsed only if the stream breaks and what was
    delivered must be priced.
    """

    keepalive = PING
    special = _SPECIAL

    def __init__(self) -> None:
        super().__init__()
        self._stopped = False
        self._terminal = MESSAGE_STOP
        self._final_delta = b""

    @property
    def complete(self) -> bool:
        return not self.failed and (self.finished or self._stopped)

    def transform(self, event: SSEEvent) -> bytes:
        name = event_type(event, _TYPE)
        if name == "message_start":
            data = event.json() or {}
            message = data.get("message")
            if isinstance(message, dict):
                self.usage = usage_from_message_start(message.get("usage"))
        elif name == "message_delta":
            data = event.json() or {}
            self.usage = merge_messages_usage(self.usage, data.get("usage"))
            delta = data.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self._stopped = True
            self._final_delta += event.raw
            return b""
        elif name == "message_stop":
            self.finished = True
            self._terminal = event.raw
            if not self._stopped:
                # No message_delta, so no output count: the usage is unknown.
                self.usage = None
            return b""
        elif name == "error":
            return self._upstream_failed()
        return self.deliver(event)

    def closing(self) -> bytes:
        return self._final_delta + self._terminal

    def error_event(self) -> bytes:
        return ERROR_EVENT

    def output_chars(self) -> int:
        deltas = [
            event
            for event in self.delivered_events()
            if event_type(event, _TYPE) == "content_block_delta"
        ]
        total = 0
        for delta in delta_members(deltas):
            if not isinstance(delta, dict):
                continue
            for key in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(key), str):
                    total += len(delta[key])
        return total
