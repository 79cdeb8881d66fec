"""OpenAI Responses, client side only: no provider kind is sent a translated Responses
request (openai-kind providers that speak it get it natively).

`read_request`, `write_response`, `ResponsesStreamEncoder`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.exceptions import BadRequest
from llm_proxy.formats.responses import KEEPALIVE, error_event
from llm_proxy.pipeline.sse import format_event
from llm_proxy.translate import ir

if TYPE_CHECKING:
    from usage.pricing import TokenUsage

API = "responses"

_MAPPED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "text",
        "reasoning",
    }
)
# Hints and bookkeeping with no effect on the answer (docs/TRANSLATION.md). `store`:
# nothing is stored on a translated route, and the answer says so (`"store": false`).
_IGNORED = frozenset(
    {
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "stream_options",
    }
)
_NEUTRAL = {"truncation": "disabled"}
_STATEFUL = ("previous_response_id", "conversation", "prompt")


# --- reading the request -----------------------------------------------------------------


def _parts(content: Any, role: str, target: str) -> list[ir.Part]:
    if isinstance(content, str):
        return [ir.Text(content)]
    parts: list[ir.Part] = []
    for part in content:
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            parts.append(ir.Text(str(part.get("text") or "")))
        elif kind == "refusal" and role == "assistant":
            parts.append(ir.Text(str(part.get("refusal") or "")))
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append(ir.Image.from_url(part["image_url"]))
        else:
            feature = "Images by file_id" if kind == "input_image" else f"'{kind}' content"
            ir.untranslatable(feature, source=API, target=target, param="input")
    return parts


def _items(body: dict[str, Any], target: str) -> list[ir.Message]:
    messages: list[ir.Message] = []
    if body.get("instructions"):
        messages.append(ir.Message("system", [ir.Text(body["instructions"])]))
    source = body.get("input")
    if isinstance(source, str):
        messages.append(ir.Message("user", [ir.Text(source)]))
        return messages
    for item in source or ():
        kind = item.get("type", "message")
        if kind == "message":
            role = item["role"]
            role = "system" if role == "developer" else role
            messages.append(ir.Message(role, _parts(item["content"], role, target)))
        elif kind == "function_call":
            call = ir.ToolCall(
                id=item["call_id"], name=item["name"], arguments=str(item.get("arguments") or "")
            )
            if messages and messages[-1].role == "assistant":
                messages[-1].parts.append(call)
            else:
                messages.append(ir.Message("assistant", [call]))
        elif kind == "function_call_output":
            output = item.get("output")
            content: list[ir.Text | ir.Image] = []
            for part in _parts(output if output is not None else "", "user", target):
                if not isinstance(part, ir.Text | ir.Image):
                    raise BadRequest("function_call_output must be text or images", param="input")
                content.append(part)
            messages.append(
                ir.Message("user", [ir.ToolResult(call_id=item["call_id"], content=content)])
            )
        else:
            ir.untranslatable(f"'{kind}' input items", source=API, target=target, param="input")
    return messages


def _response_format(text: Any, target: str) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        return None
    for name, value in text.items():
        if name != "format" and value is not None:
            ir.untranslatable(f"text.{name}", source=API, target=target, param="text")
    fmt = text.get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {
            key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt
        }
        return {"type": "json_schema", "json_schema": schema}
    ir.untranslatable(f"text.format '{fmt.get('type')}'", source=API, target=target, param="text")


def read_request(body: dict[str, Any], target: str) -> ir.Conversation:
    """A Responses request (already validated by formats.responses) in neutral terms."""
    for name in _STATEFUL:
        if body.get(name):
            raise BadRequest(
                f"{name} needs a provider with the Responses API: the gateway keeps no "
                "conversation state when it translates to another API",
                code="untranslatable_request",
                param=name,
            )
    ir.check_fields(
        body, mapped=_MAPPED, ignored=_IGNORED, neutral=_NEUTRAL, source=API, target=target
    )
    conversation = ir.Conversation(
        source=API,
        messages=_items(body, target),
        stream=body.get("stream") is True,
        max_output_tokens=body.get("max_output_tokens"),
        temperature=ir.expect_number(body, "temperature"),
        top_p=ir.expect_number(body, "top_p"),
        parallel_tool_calls=ir.expect(body, "parallel_tool_calls", bool, "a boolean"),
        user=ir.expect(body, "user", str, "a string"),
        response_format=_response_format(ir.expect(body, "text", dict, "an object"), target),
    )
    reasoning = ir.expect(body, "reasoning", dict, "an object")
    if isinstance(reasoning, dict):
        for name, value in reasoning.items():
            if name != "effort" and value is not None:
                ir.untranslatable(f"reasoning.{name}", source=API, target=target, param="reasoning")
        conversation.reasoning_effort = reasoning.get("effort")
    for tool in body.get("tools") or ():
        if tool["type"] != "function":
            ir.untranslatable(f"The built-in '{tool['type']}' tool", source=API, target=target)
        if not isinstance(tool.get("name"), str):
            raise BadRequest("function tools need a name", param="tools")
        conversation.tools.append(ir.Tool.from_function(tool))
    choice = ir.expect(body, "tool_choice", (str, dict), "a string or an object")
    if isinstance(choice, str):
        conversation.tool_choice = choice
    elif isinstance(choice, dict):
        if choice.get("type") != "function":
            feature = f"tool_choice '{choice.get('type')}'"
            ir.untranslatable(feature, source=API, target=target, param="tool_choice")
        conversation.tool_choice, conversation.tool_choice_name = "tool", choice.get("name")
    return conversation


# --- writing the answer ------------------------------------------------------------------


def usage_to_responses(usage: TokenUsage | None) -> dict[str, Any]:
    """Responses counts cached tokens inside input_tokens, like chat."""
    prompt = usage.prompt_tokens if usage else 0
    output = usage.output_tokens if usage else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens if usage else 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _status(stop: ir.StopReason) -> tuple[str, dict[str, str] | None]:
    if stop == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if stop == "refusal":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_object(
    *,
    request: dict[str, Any],
    id: str,
    created: int,
    model: str,
    status: str,
    incomplete_details: dict[str, str] | None,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A Response object; request parameters are echoed as the Responses API does."""
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _call_item(item_id: str, call: ir.ToolCall, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


def write_response(
    completion: ir.Completion, *, request: dict[str, Any], created: int
) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush_text() -> None:
        if texts:
            item_id = f"msg_{completion.id}_{len(output)}"
            output.append(_message_item(item_id, [_text_part("".join(texts))], "completed"))
            texts.clear()

    for part in completion.parts:
        if isinstance(part, ir.Text):
            texts.append(part.text)
        else:
            flush_text()
            output.append(_call_item(f"fc_{completion.id}_{len(output)}", part, "completed"))
    flush_text()
    if completion.refusal:
        refusal = {"type": "refusal", "refusal": completion.refusal}
        output.append(_message_item(f"msg_{completion.id}_{len(output)}", [refusal], "completed"))
    status, incomplete = _status(completion.stop)
    return response_object(
        request=request,
        id=f"resp_{completion.id}",
        created=created,
        model=completion.model,
        status=status,
        incomplete_details=incomplete,
        output=output,
        usage=usage_to_responses(completion.usage),
    )


class ResponsesStreamEncoder(ir.StreamEncoder):
    """Responses events from neutral stream events, in the order the openai SDK's
    `responses.stream()` accumulates; the terminal event (`response.completed`, or
    `response.incomplete` for a capped answer) carries the whole response."""

    keepalive = KEEPALIVE

    def __init__(self, *, request: dict[str, Any], created: int) -> None:
        self.request = request
        self.created = created
        self.id = ""
        self.model = ""
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text: list[str] = []
        self._stop: ir.StopReason = "end"

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = format_event({"type": kind, "sequence_number": self._sequence, **fields}, kind)
        self._sequence += 1
        return event

    def _response(self, status: str, incomplete: dict[str, str] | None, usage: Any) -> dict:
        return response_object(
            request=self.request,
            id=self.id,
            created=self.created,
            model=self.model,
            status=status,
            incomplete_details=incomplete,
            output=self._output if status != "in_progress" else [],
            usage=usage,
        )

    def start(self, *, id: str, model: str) -> bytes:
        self.id, self.model = f"resp_{id}", model
        response = self._response("in_progress", None, None)
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.id.removeprefix('resp_')}_{len(self._output)}"

    def text(self, delta: str) -> bytes:
        out = b""
        if self._open is None or self._open["type"] != "message":
            out += self.block_end()
            self._open = _message_item(self._item_id("msg"), [], "in_progress")
            self._text = []
            at = {"item_id": self._open["id"], "output_index": len(self._output)}
            out += self._event(
                "response.output_item.added", output_index=len(self._output), item=self._open
            )
            out += self._event(
                "response.content_part.added", **at, content_index=0, part=_text_part("")
            )
        self._text.append(delta)
        return out + self._event(
            "response.output_text.delta",
            item_id=self._open["id"],
            output_index=len(self._output),
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    def tool_call(self, *, call_id: str, name: str) -> bytes:
        out = self.block_end()
        self._open = _call_item(
            self._item_id("fc"), ir.ToolCall(id=call_id, name=name, arguments=""), "in_progress"
        )
        self._text = []
        return out + self._event(
            "response.output_item.added", output_index=len(self._output), item=self._open
        )

    def tool_arguments(self, fragment: str) -> bytes:
        if self._open is None or self._open["type"] != "function_call":
            return b""
        self._text.append(fragment)
        return self._event(
            "response.function_call_arguments.delta",
            item_id=self._open["id"],
            output_index=len(self._output),
            delta=fragment,
        )

    def block_end(self) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        at = {"item_id": item["id"], "output_index": len(self._output)}
        text = "".join(self._text)
        out = b""
        if item["type"] == "message":
            part = _text_part(text)
            out += self._event(
                "response.output_text.done", **at, content_index=0, text=text, logprobs=[]
            )
            out += self._event("response.content_part.done", **at, content_index=0, part=part)
            done = {**item, "status": "completed", "content": [part]}
        else:
            out += self._event(
                "response.function_call_arguments.done", **at, name=item["name"], arguments=text
            )
            done = {**item, "status": "completed", "arguments": text}
        out += self._event("response.output_item.done", output_index=len(self._output), item=done)
        self._output.append(done)
        return out

    def finish(self, stop: ir.StopReason, stop_sequence: str | None = None) -> bytes:
        self._stop = stop
        return b""

    def closing(self, usage: TokenUsage | None) -> bytes:
        out = self.block_end()
        status, incomplete = _status(self._stop)
        response = self._response(status, incomplete, usage_to_responses(usage))
        return out + self._event(f"response.{status}", response=response)

    def error(self) -> bytes:
        return error_event(self._sequence)
