"""AWS Bedrock's Converse API, written and read in neutral terms (translate.ir).

Upstream side only: no client speaks Converse, so every request to a bedrock-kind
provider is translated: `write_request`, `read_response`, `ConverseStreamDecoder`, and
`FORMAT` (what the gateway reads from an answer: usage, output size, stream errors).

ConverseStream's binary event-stream framing is undone by the provider
(llm_proxy/providers/bedrock.py), which hands this module server-sent events named after
the frame's event type, with the frame's JSON payload as data.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from llm_proxy.formats.base import as_int
from llm_proxy.translate import ir
from usage.pricing import TokenUsage

if TYPE_CHECKING:
    from llm_proxy.pipeline.sse import SSEEvent

API = "converse"

STOP_FROM_CONVERSE: dict[str, ir.StopReason] = {
    "end_turn": "end",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "refusal",
    "content_filtered": "refusal",
}
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
# The exception events ConverseStream may send instead of (or after) its answer.
STREAM_EXCEPTIONS = frozenset(
    {
        "internalServerException",
        "modelStreamErrorException",
        "validationException",
        "throttlingException",
        "serviceUnavailableException",
    }
)


def usage_from_converse(usage: Any) -> TokenUsage | None:
    """Converse counts cache reads and writes beside inputTokens, as Anthropic does."""
    if not isinstance(usage, dict):
        return None
    return TokenUsage(
        input_tokens=as_int(usage.get("inputTokens")),
        output_tokens=as_int(usage.get("outputTokens")),
        cache_read_tokens=as_int(usage.get("cacheReadInputTokens")),
        cache_write_tokens=as_int(usage.get("cacheWriteInputTokens")),
    )


# --- writing the request ------------------------------------------------------------------


def _image(part: ir.Image, conversation: ir.Conversation) -> dict[str, Any]:
    image_format = _IMAGE_FORMATS.get(part.media_type or "")
    if part.data is None or image_format is None:
        # Converse takes image bytes (or S3 locations), never a web URL.
        conversation.reject("Images by URL or of a type other than PNG, JPEG, GIF, WebP", API)
    return {"image": {"format": image_format, "source": {"bytes": part.data}}}


def _block(part: Any, conversation: ir.Conversation) -> dict[str, Any] | None:
    if isinstance(part, ir.Text):
        # Converse refuses empty text blocks; an empty text says nothing.
        return {"text": part.text} if part.text else None
    if isinstance(part, ir.Image):
        return _image(part, conversation)
    if isinstance(part, ir.ToolCall):
        arguments = part.request_input("a bedrock provider")
        return {"toolUse": {"toolUseId": part.id, "name": part.name, "input": arguments}}
    content = [
        {"text": item.text} if isinstance(item, ir.Text) else _image(item, conversation)
        for item in part.content
        if not isinstance(item, ir.Text) or item.text
    ]
    result: dict[str, Any] = {"toolUseId": part.call_id, "content": content or [{"text": ""}]}
    if part.is_error:
        result["status"] = "error"
    return {"toolResult": result}


def _messages(conversation: ir.Conversation) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    system, turns = conversation.turns(API, lambda part: _block(part, conversation))
    messages = [{"role": role, "content": blocks} for role, blocks in turns]
    return messages, [{"text": text} for text in system]


def write_request(conversation: ir.Conversation, model: str) -> dict[str, Any]:
    """The Converse request body (the model and the stream mode are in the URL)."""
    conversation.refuse(API, "response_format", "reasoning_effort", "parallel_tool_calls")
    messages, system = _messages(conversation)
    body: dict[str, Any] = {"messages": messages}
    if system:
        body["system"] = system
    inference = conversation.sampling(max_tokens="maxTokens")
    if inference:
        body["inferenceConfig"] = inference
    if conversation.tools:
        tools = []
        for tool in conversation.tools:
            spec = tool.declaration(inputSchema={"json": tool.parameters})
            tools.append({"toolSpec": spec})
        tool_config: dict[str, Any] = {"tools": tools}
        choice = conversation.tool_choice
        if choice == "none":
            # Converse has no way to offer tools and forbid their use.
            conversation.reject("tool_choice 'none'", API)
        if choice == "tool":
            tool_config["toolChoice"] = {"tool": {"name": conversation.tool_choice_name}}
        elif choice is not None:
            tool_config["toolChoice"] = {"any" if choice == "required" else "auto": {}}
        body["toolConfig"] = tool_config
    elif conversation.tool_choice not in (None, "none", "auto"):
        conversation.reject(f"tool_choice '{conversation.tool_choice}' without tools", API)
    return body


# --- reading the answer -------------------------------------------------------------------


def new_id() -> str:
    """Converse answers carry no id; the client's API needs one."""
    return f"msg_bdrk_{uuid.uuid4().hex}"


def read_response(body: dict[str, Any]) -> ir.Completion:
    output = body.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        raise ir.TranslationError("a Converse answer without a message")
    parts: list[ir.Text | ir.ToolCall] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            parts.append(ir.Text(block["text"]))
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            parts.append(
                ir.ToolCall(
                    id=str(use.get("toolUseId") or ""),
                    name=str(use.get("name") or ""),
                    arguments=json.dumps(use.get("input") or {}),
                )
            )
        elif "reasoningContent" not in block:
            # Reasoning is never requested on a translated route; anything else the
            # client's API has no place for.
            raise ir.TranslationError(f"a '{next(iter(block), '')}' content block")
    return ir.Completion(
        id=new_id(),
        model="",
        parts=parts,
        stop=STOP_FROM_CONVERSE.get(str(body.get("stopReason")), "end"),
        usage=usage_from_converse(body.get("usage")),
    )


class ConverseStreamDecoder(ir.StreamDecoder):
    """Reads ConverseStream events into neutral events for a client encoder.

    The stream is messageStart, content blocks, messageStop (the stop reason), then
    metadata (usage), which is its last event.
    """

    def __init__(self, model: str = "") -> None:
        super().__init__()
        self.model = model
        self._skipped: set[Any] = set()  # blocks the client's API has no place for

    def feed(self, event: SSEEvent, out: ir.StreamEncoder) -> bytes:
        data = event.json()
        kind = event.name
        if kind in STREAM_EXCEPTIONS:
            return self.fail()
        if data is None:
            return b""
        if kind == "contentBlockDelta":
            if data.get("contentBlockIndex") in self._skipped:
                return b""
            delta = data.get("delta") or {}
            if isinstance(delta.get("text"), str) and delta["text"]:
                return self.text(out, delta["text"])
            fragment = (delta.get("toolUse") or {}).get("input")
            if isinstance(fragment, str) and fragment:
                return self.tool_arguments(out, fragment)
            if "reasoningContent" in delta:
                self._skipped.add(data.get("contentBlockIndex"))
            return b""
        if kind == "contentBlockStart":
            use = (data.get("start") or {}).get("toolUse")
            if isinstance(use, dict):
                return out.tool_call(call_id=str(use.get("toolUseId")), name=str(use.get("name")))
            return b""
        if kind == "contentBlockStop":
            if data.get("contentBlockIndex") in self._skipped:
                return b""
            return out.block_end()
        if kind == "messageStart":
            return out.start(id=new_id(), model=self.model)
        if kind == "messageStop":
            self._stopped = True
            return out.finish(STOP_FROM_CONVERSE.get(str(data.get("stopReason")), "end"))
        if kind == "metadata":
            self.usage = usage_from_converse(data.get("usage"))
            self.finished = True
        return b""


class ConverseFormat(ir.UpstreamOnlyFormat):
    def is_stream_error(self, event: SSEEvent) -> bool:
        return event.name in STREAM_EXCEPTIONS


FORMAT = ConverseFormat(
    API, read=read_response, read_usage=lambda body: usage_from_converse(body.get("usage"))
)
