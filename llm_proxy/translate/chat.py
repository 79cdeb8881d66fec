"""OpenAI Chat Completions, read and written in neutral terms (translate.ir).

Client side: `read_request` (a chat request for a provider of another API),
`write_response`, `ChatStreamEncoder`. Upstream side: `write_request` (a request for an
openai-kind provider), `read_response`, `ChatStreamDecoder`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from common.exceptions import BadRequest
from llm_proxy.formats.chat import usage_from_chat, usage_requested
from llm_proxy.pipeline.sse import IncompleteStream, format_event
from llm_proxy.translate import ir

if TYPE_CHECKING:
    from llm_proxy.pipeline.sse import SSEEvent
    from usage.pricing import TokenUsage

API = "chat"

_MAPPED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "response_format",
        "reasoning_effort",
    }
)
# Hints with no effect on the answer; why each is safe to leave out is in
# docs/TRANSLATION.md.
_IGNORED = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "modalities": ["text"]}

STOP_FROM_CHAT: dict[str, ir.StopReason] = {
    "stop": "end",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "refusal",
}
STOP_TO_CHAT: dict[str, str] = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "refusal": "content_filter",
}


# --- client side: reading a request ------------------------------------------------------


def _text_of(content: Any, *, what: str, target: str) -> list[ir.Text]:
    """Text-only content (system, tool results): a string or text parts."""
    if isinstance(content, str):
        return [ir.Text(content)]
    parts: list[ir.Text] = []
    for part in content or ():
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(ir.Text(str(part.get("text") or "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            ir.untranslatable(f"'{kind}' content in {what}", source=API, target=target)
    return parts


def _user_parts(content: Any, target: str) -> list[ir.Part]:
    if isinstance(content, str):
        return [ir.Text(content)]
    parts: list[ir.Part] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            parts.append(ir.Text(str(part.get("text") or "")))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise BadRequest("image_url parts need a url", param="messages")
            parts.append(ir.Image.from_url(url))
        else:
            ir.untranslatable(
                f"'{kind}' content parts", source=API, target=target, param="messages"
            )
    return parts


def _assistant_parts(message: dict[str, Any], target: str) -> list[ir.Part]:
    parts: list[ir.Part] = []
    content = message.get("content")
    if isinstance(content, str):
        if content:
            parts.append(ir.Text(content))
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "refusal"):
                parts.append(ir.Text(str(part.get(kind) or "")))
            else:
                ir.untranslatable(
                    f"'{kind}' content in assistant messages", source=API, target=target
                )
    for field in ("audio", "function_call"):
        if message.get(field):
            ir.untranslatable(f"Assistant '{field}'", source=API, target=target, param="messages")
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            ir.untranslatable("Non-function tool calls", source=API, target=target)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("each tool call needs a function with a name", param="messages")
        arguments = function.get("arguments")
        parts.append(
            ir.ToolCall(
                id=str(call.get("id") or ""),
                name=function["name"],
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            )
        )
    return parts


def read_request(body: dict[str, Any], target: str) -> ir.Conversation:
    """A chat request (already validated by formats.chat) in neutral terms."""
    ir.check_fields(
        body, mapped=_MAPPED, ignored=_IGNORED, neutral=_NEUTRAL, source=API, target=target
    )
    messages: list[ir.Message] = []
    for message in body["messages"]:
        role = message["role"]
        if message.get("name"):
            ir.untranslatable("Message 'name'", source=API, target=target, param="messages")
        if role in ("system", "developer"):
            parts: list[ir.Part] = list(
                _text_of(message.get("content"), what="system messages", target=target)
            )
            messages.append(ir.Message("system", parts))
        elif role == "user":
            messages.append(ir.Message("user", _user_parts(message.get("content"), target)))
        elif role == "assistant":
            messages.append(ir.Message("assistant", _assistant_parts(message, target)))
        elif role == "tool":
            content = _text_of(message.get("content"), what="tool messages", target=target)
            result = ir.ToolResult(call_id=str(message.get("tool_call_id") or ""), content=content)
            messages.append(ir.Message("user", [result]))
        else:
            ir.untranslatable(f"The '{role}' role", source=API, target=target, param="messages")
    conversation = ir.Conversation(
        source=API,
        messages=messages,
        stream=body.get("stream") is True,
        max_output_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        temperature=ir.expect_number(body, "temperature"),
        top_p=ir.expect_number(body, "top_p"),
        stop=ir.expect_strings(body, "stop", single=True),
        parallel_tool_calls=ir.expect(body, "parallel_tool_calls", bool, "a boolean"),
        user=ir.expect(body, "user", str, "a string"),
        reasoning_effort=ir.expect(body, "reasoning_effort", str, "a string"),
    )
    conversation.include_usage = usage_requested(body)
    for tool in ir.expect(body, "tools", list, "an array") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            ir.untranslatable("Non-function tools", source=API, target=target, param="tools")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("each tool needs a function with a name", param="tools")
        conversation.tools.append(ir.Tool.from_function(function))
    choice = ir.expect(body, "tool_choice", (str, dict), "a string or an object")
    if isinstance(choice, str):
        conversation.tool_choice = choice
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            ir.untranslatable("This tool_choice", source=API, target=target, param="tool_choice")
        conversation.tool_choice, conversation.tool_choice_name = "tool", function.get("name")
    response_format = ir.expect(body, "response_format", dict, "an object")
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        conversation.response_format = response_format
    return conversation


# --- client side: writing the answer -----------------------------------------------------


def usage_to_chat(usage: TokenUsage | None) -> dict[str, Any]:
    """OpenAI counts cached prompt tokens inside prompt_tokens."""
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
    }


def _tool_call_json(call: ir.ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def write_response(completion: ir.Completion, *, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": completion.text or None,
        "refusal": completion.refusal,
    }
    if completion.tool_calls:
        message["tool_calls"] = [_tool_call_json(call) for call in completion.tool_calls]
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": STOP_TO_CHAT[completion.stop],
            }
        ],
        "usage": usage_to_chat(completion.usage),
    }


class ChatStreamEncoder(ir.StreamEncoder):
    """Chat chunks from neutral stream events; `data: [DONE]` is the terminal event."""

    keepalive = b": keepalive\n\n"

    def __init__(self, *, created: int, include_usage: bool) -> None:
        self.created = created
        self.include_usage = include_usage
        self.id = ""
        self.model = ""
        self._started = False
        self._tool_index = -1
        self._finished = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return format_event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
        )

    def start(self, *, id: str, model: str) -> bytes:
        self.id, self.model, self._started = id, model, True
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, delta: str) -> bytes:
        return self._chunk({"content": delta})

    def tool_call(self, *, call_id: str, name: str) -> bytes:
        self._tool_index += 1
        return self._chunk(
            {
                "tool_calls": [
                    {
                        "index": self._tool_index,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )

    def tool_arguments(self, fragment: str) -> bytes:
        return self._chunk(
            {"tool_calls": [{"index": self._tool_index, "function": {"arguments": fragment}}]}
        )

    def block_end(self) -> bytes:
        return b""

    def finish(self, stop: ir.StopReason, stop_sequence: str | None = None) -> bytes:
        self._finished = True
        return self._chunk({}, STOP_TO_CHAT[stop])

    def closing(self, usage: TokenUsage | None) -> bytes:
        out = b"" if self._finished else self.finish("end")
        if self.include_usage:
            out += format_event(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_to_chat(usage),
                }
            )
        return out + b"data: [DONE]\n\n"

    def error(self) -> bytes:
        return (
            format_event(
                {"error": {"message": "An error occurred during streaming", "type": "server_error"}}
            )
            + b"data: [DONE]\n\n"
        )


# --- upstream side: writing the request --------------------------------------------------


def _content_json(parts: list[Any]) -> str | list[dict[str, Any]]:
    """A string when the content is one text, else a list of parts."""
    if len(parts) == 1 and isinstance(parts[0], ir.Text):
        return parts[0].text
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, ir.Text):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, ir.Image):
            out.append({"type": "image_url", "image_url": {"url": part.as_url()}})
    return out


def _messages_json(conversation: ir.Conversation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in conversation.messages:
        if message.role == "system":
            out.append({"role": "system", "content": _content_json(message.parts)})
        elif message.role == "assistant":
            texts = [part.text for part in message.parts if isinstance(part, ir.Text)]
            calls = [part for part in message.parts if isinstance(part, ir.ToolCall)]
            entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                entry["tool_calls"] = [_tool_call_json(call) for call in calls]
            out.append(entry)
        else:
            # Tool results become tool messages, which must directly follow the assistant
            # message that called; anything else the user said comes after them.
            rest: list[Any] = []
            for part in message.parts:
                if isinstance(part, ir.ToolResult):
                    for item in part.content:
                        if isinstance(item, ir.Image):
                            conversation.reject("Images in tool results", API)
                    text = "".join(item.text for item in part.content if isinstance(item, ir.Text))
                    if part.is_error:
                        # Chat tool messages have no error flag; say it in the text.
                        text = f"Error: {text}"
                    out.append({"role": "tool", "tool_call_id": part.call_id, "content": text})
                else:
                    rest.append(part)
            if rest:
                out.append({"role": "user", "content": _content_json(rest)})
    return out


def write_request(conversation: ir.Conversation, model: str) -> dict[str, Any]:
    """The chat request for an openai-kind provider."""
    body: dict[str, Any] = {"model": model, "messages": _messages_json(conversation)}
    if conversation.stream:
        body["stream"] = True
        # Usage is what the request is charged; OpenAI only streams it when asked.
        body["stream_options"] = {"include_usage": True}
    if conversation.max_output_tokens is not None:
        body["max_completion_tokens"] = conversation.max_output_tokens
    body.update(
        conversation.fields_set(
            "temperature", "top_p", "parallel_tool_calls", "user", "reasoning_effort"
        )
    )
    if conversation.stop:
        body["stop"] = conversation.stop
    if conversation.tools:
        body["tools"] = []
        for tool in conversation.tools:
            function = tool.declaration(parameters=tool.parameters)
            if tool.strict is not None:
                function["strict"] = tool.strict
            body["tools"].append({"type": "function", "function": function})
    if conversation.tool_choice == "tool":
        body["tool_choice"] = {
            "type": "function",
            "function": {"name": conversation.tool_choice_name},
        }
    elif conversation.tool_choice is not None:
        body["tool_choice"] = conversation.tool_choice
    if conversation.response_format is not None:
        body["response_format"] = conversation.response_format
    return body


# --- upstream side: reading the answer ---------------------------------------------------


def read_response(body: dict[str, Any]) -> ir.Completion:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ir.TranslationError("a chat completion without choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ir.TranslationError("a chat choice without a message")
    parts: list[ir.Text | ir.ToolCall] = []
    if isinstance(message.get("content"), str) and message["content"]:
        parts.append(ir.Text(message["content"]))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ir.TranslationError("a tool call without a function")
        parts.append(
            ir.ToolCall(
                id=str(call.get("id") or ""),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
            )
        )
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    stop = STOP_FROM_CHAT.get(str(choice.get("finish_reason")), "end")
    if refusal:
        stop = "refusal"
    return ir.Completion(
        id=str(body.get("id") or ""),
        model=str(body.get("model") or ""),
        parts=parts,
        stop=stop,
        usage=usage_from_chat(body.get("usage")),
        refusal=refusal,
    )


class ChatStreamDecoder(ir.ChunkStreamDecoder):
    """Reads an upstream chat stream into neutral events for a client encoder."""

    def __init__(self) -> None:
        super().__init__()
        self._tool_index: int | None = None
        self._closed_tools: set[int] = set()

    @property
    def complete(self) -> bool:
        # A stream cut after its usage chunk lost nothing but `[DONE]`.
        return not self.failed and (self.finished or self._stopped or self.usage is not None)

    def answer_id(self, chunk: dict[str, Any]) -> str:
        return str(chunk.get("id") or "")

    def answer_model(self, chunk: dict[str, Any]) -> str:
        return str(chunk.get("model") or "")

    def feed(self, event: SSEEvent, out: ir.StreamEncoder) -> bytes:
        if event.data == b"[DONE]":
            self.finished = True
            return b""
        # OpenAI reports a failure inside the stream as an error object.
        return super().feed(event, out)

    def feed_chunk(self, chunk: dict[str, Any], out: ir.StreamEncoder) -> bytes:
        sent = b""
        if chunk.get("usage"):
            self.usage = usage_from_chat(chunk["usage"]) or self.usage
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for field in ("content", "refusal"):
                text = delta.get(field)
                if isinstance(text, str) and text:
                    if self._tool_index is not None:
                        sent += self._close_tool(out)
                    sent += self.text(out, text)
            for call in delta.get("tool_calls") or ():
                sent += self._tool_delta(call, out)
            reason = choice.get("finish_reason")
            if reason:
                self._stopped = True
                if self._tool_index is not None:
                    sent += self._close_tool(out)
                else:
                    sent += out.block_end()
                sent += out.finish(STOP_FROM_CHAT.get(reason, "end"))
        return sent

    def _close_tool(self, out: ir.StreamEncoder) -> bytes:
        if self._tool_index is not None:
            self._closed_tools.add(self._tool_index)
        self._tool_index = None
        return out.block_end()

    def _tool_delta(self, call: Any, out: ir.StreamEncoder) -> bytes:
        if not isinstance(call, dict):
            return b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        sent = b""
        if index != self._tool_index:
            if index in self._closed_tools or not function.get("name"):
                # Interleaved tool calls cannot be written as sequential blocks.
                raise IncompleteStream("tool call deltas out of order")
            sent += out.block_end() if self._tool_index is None else self._close_tool(out)
            self._tool_index = index
            sent += out.tool_call(call_id=str(call.get("id") or ""), name=function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            sent += self.tool_arguments(out, arguments)
        return sent
