"""Anthropic Messages, read and written in neutral terms (translate.ir).

Client side: `read_request`, `write_response`, `MessagesStreamEncoder`. Upstream side:
`write_request` (a request for an anthropic-kind provider), `read_response`,
`MessagesStreamDecoder`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from common.exceptions import BadRequest
from llm_proxy.formats.messages import (
    ERROR_EVENT,
    PING,
    merge_messages_usage,
    usage_from_message_start,
    usage_from_messages,
)
from llm_proxy.pipeline.sse import format_event
from llm_proxy.translate import ir

if TYPE_CHECKING:
    from llm_proxy.pipeline.sse import SSEEvent
    from usage.pricing import TokenUsage

API = "messages"

_MAPPED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
    }
)
# A scheduling hint with no effect on the answer (docs/TRANSLATION.md).
_IGNORED = frozenset({"service_tier"})
_NEUTRAL = {"thinking": {"type": "disabled"}}

STOP_FROM_MESSAGES: dict[str, ir.StopReason] = {
    "end_turn": "end",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "refusal",
    "pause_turn": "end",
    "model_context_window_exceeded": "length",
}
STOP_TO_MESSAGES: dict[str, str] = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "refusal": "refusal",
}


# --- client side: reading a request ------------------------------------------------------


def _image(block: dict[str, Any], target: str) -> ir.Image:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return ir.Image(
            media_type=str(source.get("media_type") or ""), data=str(source.get("data"))
        )
    if isinstance(source, dict) and source.get("type") == "url":
        return ir.Image(url=str(source.get("url")))
    kind = source.get("type") if isinstance(source, dict) else None
    ir.untranslatable(
        f"Image sources of type '{kind}'", source=API, target=target, param="messages"
    )


def _tool_result(block: dict[str, Any], target: str) -> ir.ToolResult:
    content = block.get("content")
    items: list[ir.Text | ir.Image] = []
    if isinstance(content, str):
        items.append(ir.Text(content))
    for item in content if isinstance(content, list) else ():
        kind = item.get("type")
        if kind == "text":
            items.append(ir.Text(str(item.get("text") or "")))
        elif kind == "image":
            items.append(_image(item, target))
        else:
            ir.untranslatable(
                f"'{kind}' content in tool results", source=API, target=target, param="messages"
            )
    return ir.ToolResult(
        call_id=str(block["tool_use_id"]), content=items, is_error=block.get("is_error") is True
    )


def _parts(content: Any, target: str) -> list[ir.Part]:
    if isinstance(content, str):
        return [ir.Text(content)]
    parts: list[ir.Part] = []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            parts.append(ir.Text(str(block.get("text") or "")))
        elif kind == "image":
            parts.append(_image(block, target))
        elif kind == "tool_use":
            parts.append(
                ir.ToolCall(
                    id=str(block.get("id")),
                    name=str(block.get("name")),
                    arguments=json.dumps(block.get("input") or {}),
                )
            )
        elif kind == "tool_result":
            parts.append(_tool_result(block, target))
        else:
            ir.untranslatable(
                f"'{kind}' content blocks", source=API, target=target, param="messages"
            )
    return parts


def read_request(body: dict[str, Any], target: str) -> ir.Conversation:
    """A messages request (already validated by formats.messages) in neutral terms."""
    ir.check_fields(
        body, mapped=_MAPPED, ignored=_IGNORED, neutral=_NEUTRAL, source=API, target=target
    )
    messages: list[ir.Message] = []
    system = body.get("system")
    if system:
        texts = [ir.Text(system)] if isinstance(system, str) else _parts(system, target)
        messages.append(ir.Message("system", list(texts)))
    for message in body["messages"]:
        messages.append(ir.Message(message["role"], _parts(message["content"], target)))
    metadata = body.get("metadata") or {}
    for name in metadata:
        if name != "user_id":
            ir.untranslatable(f"metadata.{name}", source=API, target=target, param="metadata")
    conversation = ir.Conversation(
        source=API,
        messages=messages,
        stream=body.get("stream") is True,
        max_output_tokens=body["max_tokens"],
        temperature=ir.expect_number(body, "temperature"),
        top_p=ir.expect_number(body, "top_p"),
        stop=ir.expect_strings(body, "stop_sequences", single=False),
        user=metadata.get("user_id"),
    )
    for tool in body.get("tools") or ():
        if tool.get("type", "custom") != "custom":
            ir.untranslatable(
                f"The '{tool.get('type')}' tool", source=API, target=target, param="tools"
            )
        conversation.tools.append(
            ir.Tool(
                name=str(tool.get("name")),
                description=tool.get("description"),
                parameters=tool.get("input_schema") or {"type": "object", "properties": {}},
                strict=tool.get("strict"),
            )
        )
    choice = ir.expect(body, "tool_choice", dict, "an object")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise BadRequest(
                "tool_choice.type must be auto, any, tool or none", param="tool_choice"
            )
        conversation.tool_choice = {"any": "required", "tool": "tool"}.get(kind, kind)
        conversation.tool_choice_name = choice.get("name")
        if choice.get("disable_parallel_tool_use") is True:
            conversation.parallel_tool_calls = False
    return conversation


# --- client side: writing the answer -----------------------------------------------------


def usage_to_messages(usage: TokenUsage | None) -> dict[str, int]:
    """Anthropic counts cache reads and writes beside input_tokens."""
    if usage is None:
        return {
            "input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        }
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens,
    }


def write_response(completion: ir.Completion) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for part in completion.parts:
        if isinstance(part, ir.Text):
            content.append({"type": "text", "text": part.text})
        else:
            content.append(
                {"type": "tool_use", "id": part.id, "name": part.name, "input": part.input()}
            )
    if completion.refusal:
        content.append({"type": "text", "text": completion.refusal})
    return {
        "id": completion.id,
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": content,
        "stop_reason": STOP_TO_MESSAGES[completion.stop],
        "stop_sequence": completion.stop_sequence,
        "usage": usage_to_messages(completion.usage),
    }


class MessagesStreamEncoder(ir.StreamEncoder):
    """Messages events from neutral stream events; `message_stop` is the terminal event.

    Usage is only known at the end of an upstream chat stream, so `message_start`
    carries zeros and the final `message_delta` the whole count (the SDKs overwrite
    usage from `message_delta`, whose counts are cumulative).
    """

    keepalive = PING

    def __init__(self) -> None:
        self._started = False
        self._index = -1
        self._open: str | None = None  # "text" | "tool_use"
        self._stop: ir.StopReason = "end"
        self._stop_sequence: str | None = None

    def start(self, *, id: str, model: str) -> bytes:
        self._started = True
        message = {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_to_messages(None),
        }
        return format_event({"type": "message_start", "message": message}, "message_start")

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self.block_end()
        self._index += 1
        self._open = kind
        return out + format_event(
            {"type": "content_block_start", "index": self._index, "content_block": block},
            "content_block_start",
        )

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return format_event(
            {"type": "content_block_delta", "index": self._index, "delta": delta},
            "content_block_delta",
        )

    def text(self, delta: str) -> bytes:
        out = b""
        if self._open != "text":
            out = self._open_block("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": delta})

    def tool_call(self, *, call_id: str, name: str) -> bytes:
        return self._open_block(
            "tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        )

    def tool_arguments(self, fragment: str) -> bytes:
        return self._delta({"type": "input_json_delta", "partial_json": fragment})

    def block_end(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return format_event(
            {"type": "content_block_stop", "index": self._index}, "content_block_stop"
        )

    def finish(self, stop: ir.StopReason, stop_sequence: str | None = None) -> bytes:
        self._stop, self._stop_sequence = stop, stop_sequence
        return b""

    def closing(self, usage: TokenUsage | None) -> bytes:
        out = self.block_end()
        out += format_event(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": STOP_TO_MESSAGES[self._stop],
                    "stop_sequence": self._stop_sequence,
                },
                "usage": usage_to_messages(usage),
            },
            "message_delta",
        )
        return out + format_event({"type": "message_stop"}, "message_stop")

    def error(self) -> bytes:
        return ERROR_EVENT


# --- upstream side: writing the request --------------------------------------------------


def _block_json(part: Any, conversation: ir.Conversation) -> dict[str, Any] | None:
    if isinstance(part, ir.Text):
        # Anthropic refuses empty text blocks; an empty text says nothing.
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, ir.Image):
        if part.url is not None:
            return {"type": "image", "source": {"type": "url", "url": part.url}}
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": part.media_type, "data": part.data},
        }
    if isinstance(part, ir.ToolCall):
        arguments = part.request_input("an anthropic provider")
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": arguments}
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": part.call_id}
    blocks = [block for item in part.content if (block := _block_json(item, conversation))]
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        result["content"] = blocks[0]["text"]
    elif blocks:
        result["content"] = blocks
    if part.is_error:
        result["is_error"] = True
    return result


def _messages_json(conversation: ir.Conversation) -> tuple[list[dict[str, Any]], list[str]]:
    system, turns = conversation.turns(API, lambda part: _block_json(part, conversation))
    messages: list[dict[str, Any]] = []
    for role, content in turns:
        # Tool results must open the user turn that answers the calls.
        content.sort(key=lambda block: block["type"] != "tool_result")
        if len(content) == 1 and content[0]["type"] == "text":
            messages.append({"role": role, "content": content[0]["text"]})
        else:
            messages.append({"role": role, "content": content})
    return messages, system


def write_request(
    conversation: ir.Conversation, model: str, *, default_max_tokens: int
) -> dict[str, Any]:
    """The messages request for an anthropic-kind provider."""
    conversation.refuse(API, "response_format", "reasoning_effort")
    if conversation.temperature is not None and conversation.temperature > 1:
        conversation.reject("A temperature above 1 (Anthropic's range is 0 to 1)", API)
    messages, system = _messages_json(conversation)
    body: dict[str, Any] = {
        "model": model,
        # Anthropic requires a cap; the default is also what the hold was estimated on.
        "max_tokens": conversation.max_output_tokens or default_max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = (
            system[0] if len(system) == 1 else [{"type": "text", "text": text} for text in system]
        )
    if conversation.stream:
        body["stream"] = True
    body.update(conversation.fields_set("temperature", "top_p"))
    if conversation.stop:
        body["stop_sequences"] = conversation.stop
    if conversation.tools:
        body["tools"] = []
        for tool in conversation.tools:
            entry = tool.declaration(input_schema=tool.parameters)
            if tool.strict:
                entry["strict"] = True
            body["tools"].append(entry)
    choice: dict[str, Any] | None = None
    if conversation.tool_choice == "tool":
        choice = {"type": "tool", "name": conversation.tool_choice_name}
    elif conversation.tool_choice is not None:
        kind = {"required": "any"}.get(conversation.tool_choice, conversation.tool_choice)
        if kind not in ("auto", "any", "none"):
            conversation.reject(f"tool_choice '{conversation.tool_choice}'", API)
        choice = {"type": kind}
    if conversation.parallel_tool_calls is False and conversation.tool_choice != "none":
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        body["tool_choice"] = choice
    if conversation.user:
        body["metadata"] = {"user_id": conversation.user}
    return body


# --- upstream side: reading the answer ---------------------------------------------------


def read_response(body: dict[str, Any]) -> ir.Completion:
    content = body.get("content")
    if not isinstance(content, list):
        raise ir.TranslationError("a message without content")
    parts: list[ir.Text | ir.ToolCall] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(ir.Text(str(block.get("text") or "")))
        elif kind == "tool_use":
            parts.append(
                ir.ToolCall(
                    id=str(block.get("id") or ""),
                    name=str(block.get("name") or ""),
                    arguments=json.dumps(block.get("input") or {}),
                )
            )
        elif kind not in ("thinking", "redacted_thinking"):
            # Thinking is never requested on a translated route; anything else the
            # client's API has no place for.
            raise ir.TranslationError(f"a '{kind}' content block")
    stop_sequence = body.get("stop_sequence")
    return ir.Completion(
        id=str(body.get("id") or ""),
        model=str(body.get("model") or ""),
        parts=parts,
        stop=STOP_FROM_MESSAGES.get(str(body.get("stop_reason")), "end"),
        usage=usage_from_messages(body.get("usage")),
        stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
    )


class MessagesStreamDecoder(ir.StreamDecoder):
    """Reads an upstream messages stream into neutral events for a client encoder."""

    def __init__(self) -> None:
        super().__init__()
        self._skipped: set[int] = set()  # blocks the client's API has no place for

    def feed(self, event: SSEEvent, out: ir.StreamEncoder) -> bytes:
        data = event.json()
        if data is None:
            return b""
        kind = event.name or data.get("type")
        if kind == "content_block_delta":
            if data.get("index") in self._skipped:
                return b""
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return self.text(out, delta["text"])
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                return self.tool_arguments(out, delta["partial_json"])
            return b""
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "text":
                return out.text(block["text"]) if block.get("text") else b""
            if block.get("type") == "tool_use":
                return out.tool_call(call_id=str(block.get("id")), name=str(block.get("name")))
            self._skipped.add(data.get("index"))
            return b""
        if kind == "content_block_stop":
            return b"" if data.get("index") in self._skipped else out.block_end()
        if kind == "message_start":
            message = data.get("message") or {}
            self.usage = usage_from_message_start(message.get("usage"))
            return out.start(id=str(message.get("id") or ""), model=str(message.get("model") or ""))
        if kind == "message_delta":
            self.usage = merge_messages_usage(self.usage, data.get("usage"))
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._stopped = True
                sequence = delta.get("stop_sequence")
                return out.finish(
                    STOP_FROM_MESSAGES.get(delta["stop_reason"], "end"),
                    sequence if isinstance(sequence, str) else None,
                )
            return b""
        if kind == "message_stop":
            self.finished = True
            if not self._stopped:
                # No message_delta, so no output count: the usage is unknown.
                self.usage = None
        elif kind == "error":
            return self.fail()
        return b""
