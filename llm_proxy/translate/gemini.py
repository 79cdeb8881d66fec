"""Google's generateContent API (Gemini on AI Studio and on Vertex AI), written and read in
neutral terms (translate.ir).

Upstream side only: no client speaks generateContent, so every request to a gemini- or
vertex-kind provider is translated: `write_request`, `read_response`,
`GeminiStreamDecoder`, and `FORMAT` (what the gateway reads from an answer).
streamGenerateContent with `alt=sse` answers in server-sent events, each a whole
GenerateContentResponse; there is no terminal event: the last one carries the finish
reason and the final usage, and the connection then ends.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from common.exceptions import BadRequest
from llm_proxy.formats.base import as_int
from llm_proxy.translate import ir
from usage.pricing import TokenUsage

if TYPE_CHECKING:
    from llm_proxy.pipeline.sse import SSEEvent

API = "gemini"

_REFUSALS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)


def usage_from_gemini(usage: Any) -> TokenUsage | None:
    """Gemini counts cached tokens inside promptTokenCount, bills thinking as output, and
    reports the prompt of its own tool use (e.g. search results) apart."""
    if not isinstance(usage, dict):
        return None
    cached = as_int(usage.get("cachedContentTokenCount"))
    prompt = as_int(usage.get("promptTokenCount")) + as_int(usage.get("toolUsePromptTokenCount"))
    return TokenUsage(
        input_tokens=max(0, prompt - cached),
        output_tokens=as_int(usage.get("candidatesTokenCount"))
        + as_int(usage.get("thoughtsTokenCount")),
        cache_read_tokens=cached,
    )


def _stop(finish_reason: Any, called_tools: bool) -> ir.StopReason:
    if finish_reason == "MAX_TOKENS":
        return "length"
    if finish_reason in _REFUSALS:
        return "refusal"
    # Gemini says STOP after a function call too.
    return "tool_calls" if called_tools else "end"


# --- writing the request ------------------------------------------------------------------


def _part(part: Any, names: dict[str, str], conversation: ir.Conversation) -> dict[str, Any] | None:
    if isinstance(part, ir.Text):
        return {"text": part.text} if part.text else None
    if isinstance(part, ir.Image):
        if part.data is None:
            # generateContent takes inline bytes or uploaded files, not web URLs.
            conversation.reject("Images by URL", API)
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    if isinstance(part, ir.ToolCall):
        arguments = part.request_input("a Gemini provider")
        names[part.id] = part.name
        return {"functionCall": {"name": part.name, "args": arguments}}
    return _function_response(part, names, conversation)


def _function_response(
    part: ir.ToolResult, names: dict[str, str], conversation: ir.Conversation
) -> dict[str, Any]:
    # Gemini matches a result to its call by the function's name, not by an id.
    name = names.get(part.call_id)
    if name is None:
        raise BadRequest(
            f"Tool result '{part.call_id}' answers no earlier tool call", param="messages"
        )
    if any(isinstance(item, ir.Image) for item in part.content):
        conversation.reject("Images in tool results", API)
    text = "".join(item.text for item in part.content if isinstance(item, ir.Text))
    return {
        "functionResponse": {
            "name": name,
            "response": {"error" if part.is_error else "result": text},
        }
    }


def _contents(conversation: ir.Conversation) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    names: dict[str, str] = {}  # tool call id -> function name, for the results
    system, turns = conversation.turns(API, lambda part: _part(part, names, conversation))
    contents = [
        {"role": "model" if role == "assistant" else "user", "parts": parts}
        for role, parts in turns
    ]
    return contents, [{"text": text} for text in system]


def _response_format(conversation: ir.Conversation, config: dict[str, Any]) -> None:
    wanted = conversation.response_format or {}
    if wanted.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif wanted.get("type") == "json_schema":
        spec = wanted.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(
                "response_format.json_schema.schema is required", param="response_format"
            )
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = schema
    else:
        conversation.reject(f"response_format type '{wanted.get('type')}'", API)


def write_request(conversation: ir.Conversation, model: str) -> dict[str, Any]:
    """The generateContent body (the model and the stream mode are in the URL)."""
    conversation.refuse(API, "reasoning_effort", "parallel_tool_calls")
    contents, system = _contents(conversation)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config = conversation.sampling(max_tokens="maxOutputTokens")
    if conversation.response_format is not None:
        _response_format(conversation, config)
    if config:
        body["generationConfig"] = config
    if conversation.tools:
        declarations = []
        for tool in conversation.tools:
            # parametersJsonSchema takes JSON Schema as clients write it (`parameters`
            # takes only Google's OpenAPI subset).
            declarations.append(tool.declaration(parametersJsonSchema=tool.parameters))
        body["tools"] = [{"functionDeclarations": declarations}]
    choice = conversation.tool_choice
    if choice is not None:
        calling: dict[str, Any] = {"mode": {"auto": "AUTO", "none": "NONE"}.get(choice, "ANY")}
        if choice == "tool":
            calling["allowedFunctionNames"] = [conversation.tool_choice_name]
        body["toolConfig"] = {"functionCallingConfig": calling}
    return body


# --- reading the answer -------------------------------------------------------------------


def _call(function_call: dict[str, Any]) -> ir.ToolCall:
    return ir.ToolCall(
        # Gemini's calls carry an id only on some models; the client's API needs one.
        id=str(function_call.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
        name=str(function_call.get("name") or ""),
        arguments=json.dumps(function_call.get("args") or {}),
    )


def _candidate_parts(candidate: dict[str, Any]) -> list[ir.Text | ir.ToolCall]:
    content = candidate.get("content")
    parts: list[ir.Text | ir.ToolCall] = []
    for part in content.get("parts") or () if isinstance(content, dict) else ():
        if not isinstance(part, dict) or part.get("thought") is True:
            continue  # thoughts are never shown on a translated route (but billed)
        if isinstance(part.get("text"), str):
            parts.append(ir.Text(part["text"]))
        elif isinstance(part.get("functionCall"), dict):
            parts.append(_call(part["functionCall"]))
        else:
            raise ir.TranslationError(f"a '{next(iter(part), '')}' part")
    return parts


def read_response(body: dict[str, Any]) -> ir.Completion:
    candidates = body.get("candidates")
    usage = usage_from_gemini(body.get("usageMetadata"))
    answer_id = str(body.get("responseId") or f"gen_{uuid.uuid4().hex}")
    model = str(body.get("modelVersion") or "")
    if not isinstance(candidates, list) or not candidates:
        feedback = body.get("promptFeedback")
        reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if reason is None:
            raise ir.TranslationError("an answer without candidates")
        return ir.Completion(
            id=answer_id,
            model=model,
            parts=[],
            stop="refusal",
            usage=usage,
            refusal=f"The prompt was blocked ({reason})",
        )
    candidate = candidates[0] if isinstance(candidates[0], dict) else {}
    parts = _candidate_parts(candidate)
    called = any(isinstance(part, ir.ToolCall) for part in parts)
    return ir.Completion(
        id=answer_id,
        model=model,
        parts=parts,
        stop=_stop(candidate.get("finishReason"), called),
        usage=usage,
    )


class GeminiStreamDecoder(ir.ChunkStreamDecoder):
    """Reads a streamGenerateContent (alt=sse) stream into neutral events. There is no
    terminal event: the stream just ends, so `finished` is only set by a failure."""

    def __init__(self, model: str = "") -> None:
        super().__init__()
        self.model = model
        self._called = False

    def answer_id(self, chunk: dict[str, Any]) -> str:
        return str(chunk.get("responseId") or f"gen_{uuid.uuid4().hex}")

    def answer_model(self, chunk: dict[str, Any]) -> str:
        return str(chunk.get("modelVersion") or self.model)

    def feed_chunk(self, chunk: dict[str, Any], out: ir.StreamEncoder) -> bytes:
        sent = b""
        if isinstance(chunk.get("usageMetadata"), dict):
            # Each chunk's counts are the running totals; the last chunk's are final.
            self.usage = usage_from_gemini(chunk["usageMetadata"])
        candidates = chunk.get("candidates")
        candidate = candidates[0] if isinstance(candidates, list) and candidates else None
        if not isinstance(candidate, dict):
            return sent
        try:
            parts = _candidate_parts(candidate)
        except ir.TranslationError:
            self.failed = True
            return sent
        for part in parts:
            if isinstance(part, ir.Text):
                if part.text:
                    sent += self.text(out, part.text)
            else:
                # A function call arrives whole, in one chunk.
                self._called = True
                sent += out.tool_call(call_id=part.id, name=part.name)
                sent += self.tool_arguments(out, part.arguments)
                sent += out.block_end()
        if candidate.get("finishReason"):
            self._stopped = True
            sent += out.finish(_stop(candidate["finishReason"], self._called))
        return sent


class GeminiFormat(ir.UpstreamOnlyFormat):
    def is_stream_error(self, event: SSEEvent) -> bool:
        data = event.json()
        return data is not None and "error" in data


FORMAT = GeminiFormat(
    API, read=read_response, read_usage=lambda body: usage_from_gemini(body.get("usageMetadata"))
)
