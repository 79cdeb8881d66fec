"""The neutral shapes translation goes through (docs/TRANSLATION.md).

Every client API is read into these shapes and every upstream API is written from
them, so that three client APIs and two upstream APIs need one reader and one writer
each rather than one translator per pair. A field that has no place here is not
silently dropped: the reader rejects it with a 400 naming it (`untranslatable`), and a
writer rejects what its API cannot express the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from common.exceptions import BadRequest
from llm_proxy.formats.base import ApiFormat

if TYPE_CHECKING:
    from collections.abc import Callable

    from llm_proxy.pipeline.sse import SSEEvent
    from usage.pricing import TokenUsage

# Why an answer ended, in neutral terms:
#   end         the model finished (chat "stop", messages "end_turn", responses completed)
#   stop_sequence  a stop sequence matched (messages only tells which)
#   length      the output cap was reached
#   tool_calls  the model called tools and waits for their results
#   refusal     the provider refused or filtered the answer
StopReason = Literal["end", "stop_sequence", "length", "tool_calls", "refusal"]

API_TITLES = {
    "chat": "Chat Completions",
    "messages": "Anthropic Messages",
    "responses": "Responses",
    "embeddings": "Embeddings",
    # Upstream-only APIs (no client speaks them; every request to them is translated).
    "converse": "Bedrock Converse",
    "gemini": "Gemini generateContent",
}


class TranslationError(Exception):
    """An upstream answer that cannot be rendered in the client's API (a provider fault)."""


def untranslatable(feature: str, *, source: str, target: str, param: str | None = None) -> NoReturn:
    """Refuse a request that uses a feature the upstream API cannot express."""
    raise BadRequest(
        f"{feature} cannot be translated from the {API_TITLES[source]} API to a provider "
        f"that speaks the {API_TITLES[target]} API",
        code="untranslatable_request",
        param=param,
    )


# --- content ---------------------------------------------------------------------------


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    """An image by URL, or inline as base64 `data` of `media_type`."""

    url: str | None = None
    media_type: str | None = None
    data: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Image:
        """A URL, unpacking `data:<type>;base64,<data>` URLs into inline data."""
        if url.startswith("data:") and ";base64," in url:
            head, data = url[5:].split(";base64,", 1)
            return cls(media_type=head or "application/octet-stream", data=data)
        return cls(url=url)

    def as_url(self) -> str:
        if self.url is not None:
            return self.url
        return f"data:{self.media_type};base64,{self.data}"


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def input(self) -> dict[str, Any]:
        """The arguments as the object Anthropic's `input` (and Converse's, and Gemini's
        `args`) must be; a TranslationError when they are not a JSON object."""
        if not self.arguments.strip():
            return {}
        try:
            value = json.loads(self.arguments)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise TranslationError("tool call arguments that are not a JSON object")
        return value

    def request_input(self, provider: str) -> dict[str, Any]:
        """`input()` for a request the client wrote, where arguments that are not an
        object are the client's fault (a 400); `provider` names whom it is sent to."""
        try:
            return self.input()
        except TranslationError:
            raise BadRequest(
                f"Tool call arguments must be a JSON object to be sent to {provider}",
                param="messages",
            ) from None


@dataclass(slots=True)
class ToolResult:
    call_id: str
    content: list[Text | Image]
    is_error: bool = False


Part = Text | Image | ToolCall | ToolResult


@dataclass(slots=True)
class Message:
    role: Literal["system", "user", "assistant"]
    parts: list[Part]


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool | None = None

    def declaration(self, **schema: Any) -> dict[str, Any]:
        """The tool as every upstream API declares it: its name, its parameters under
        the API's own key (`schema`), then its description when it has one."""
        spec = {"name": self.name, **schema}
        if self.description is not None:
            spec["description"] = self.description
        return spec

    @classmethod
    def from_function(cls, function: dict[str, Any]) -> Tool:
        """A function tool as chat (`tools[].function`) and Responses (`tools[]`) declare
        it; the caller has checked that `name` is a string."""
        return cls(
            name=function["name"],
            description=function.get("description"),
            # A fresh empty schema each time: writers pass it on into request bodies.
            parameters=function.get("parameters") or {"type": "object", "properties": {}},
            strict=function.get("strict"),
        )


# The features a writer may refuse with Conversation.refuse, as the 400 names them.
_INEXPRESSIBLE = {
    "response_format": "Structured output (response_format / text.format)",
    "reasoning_effort": "Reasoning effort",
    "parallel_tool_calls": "Turning off parallel tool calls",
}


@dataclass(slots=True)
class Conversation:
    """A generation request, read from the client's API."""

    source: str  # the client API ("chat", "messages", "responses")
    messages: list[Message]
    stream: bool = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    # "auto" | "none" | "required" | "tool" (then tool_choice_name) | None (unset)
    tool_choice: str | None = None
    tool_choice_name: str | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # Chat-style structured output: {"type": "json_object"} or {"type": "json_schema", ...}.
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Chat clients only: send the usage chunk at the end of the stream.
    include_usage: bool = False

    def reject(self, feature: str, target: str, param: str | None = None) -> NoReturn:
        untranslatable(feature, source=self.source, target=target, param=param)

    def refuse(self, target: str, *fields: str) -> None:
        """Refuse the request when one of `fields` asks for something, because the
        `target` API has no way to express it (see _INEXPRESSIBLE)."""
        for name in fields:
            value = getattr(self, name)
            # Parallel tool calls are every API's default: only turning them off asks.
            asks = (value is False) if name == "parallel_tool_calls" else (value is not None)
            if asks:
                self.reject(_INEXPRESSIBLE[name], target)

    def fields_set(self, *names: str) -> dict[str, Any]:
        """The named fields that are set, for an API that uses the same names."""
        values = {name: getattr(self, name) for name in names}
        return {name: value for name, value in values.items() if value is not None}

    def sampling(self, *, max_tokens: str) -> dict[str, Any]:
        """The output cap, temperature, top_p and stop sequences that are set, under the
        camel-case names Converse and generateContent share (`max_tokens`: the cap's)."""
        values = {
            max_tokens: self.max_output_tokens,
            "temperature": self.temperature,
            "topP": self.top_p,
            "stopSequences": self.stop or None,
        }
        return {name: value for name, value in values.items() if value is not None}

    def turns(
        self, target: str, write: Callable[[Any], dict[str, Any] | None]
    ) -> tuple[list[str], list[tuple[str, list[dict[str, Any]]]]]:
        """The system texts and the (role, blocks) turns of the conversation, for an API
        that takes the system prompt apart and alternates roles (Messages, Converse,
        generateContent). `write` writes one part as a block, or None for a part that
        says nothing; a turn left without blocks is dropped.

        A system message after the first turn is refused: these APIs have one system
        prompt, before the conversation. Consecutive messages of one role become one
        turn (chat sends each tool result as its own message).
        """
        system: list[str] = []
        turns: list[tuple[str, list[dict[str, Any]]]] = []
        for message in self.messages:
            if message.role == "system":
                if turns:
                    self.reject("A system message after the conversation has started", target)
                system.extend(part.text for part in message.parts if isinstance(part, Text))
                continue
            blocks = [block for part in message.parts if (block := write(part))]
            if not blocks:
                continue
            if turns and turns[-1][0] == message.role:
                turns[-1][1].extend(blocks)
            else:
                turns.append((message.role, blocks))
        return system, turns


# --- answers ---------------------------------------------------------------------------


@dataclass(slots=True)
class Completion:
    """A non-streamed answer, read from the upstream's API."""

    id: str
    model: str
    parts: list[Text | ToolCall]
    stop: StopReason
    usage: TokenUsage | None
    stop_sequence: str | None = None
    refusal: str | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, Text))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [part for part in self.parts if isinstance(part, ToolCall)]


class UpstreamOnlyFormat(ApiFormat):
    """An API that only providers speak (Bedrock Converse, Gemini generateContent): every
    request to it is translated, so the gateway only reads its answers. `read` is the
    API's reader of a whole answer; `read_usage` its usage, from an answer's body."""

    read: Callable[[dict[str, Any]], Completion]
    read_usage: Callable[[dict[str, Any]], TokenUsage | None]

    def __init__(
        self,
        name: str,
        *,
        read: Callable[[dict[str, Any]], Completion],
        read_usage: Callable[[dict[str, Any]], TokenUsage | None],
    ) -> None:
        self.name = self.endpoint = name
        self.read = read
        self.read_usage = read_usage

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        return self.read_usage(body)

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        try:
            completion = self.read(body)
        except TranslationError:
            return 0
        return len(completion.text) + sum(len(call.arguments) for call in completion.tool_calls)


# --- request fields --------------------------------------------------------------------

# Values that ask for nothing: a field sent with one of them can be left out.
_NEUTRAL: tuple[Any, ...] = (None, False, "", [], {})


def check_fields(
    body: dict[str, Any],
    *,
    mapped: frozenset[str],
    ignored: frozenset[str],
    neutral: dict[str, Any] | None = None,
    source: str,
    target: str,
) -> None:
    """Refuse any field the translation would drop.

    `mapped` fields are translated; `ignored` ones are hints with no effect on the
    answer (listed, with reasons, in docs/TRANSLATION.md); any other field is refused
    unless it carries a value that asks for nothing (null, false, empty, or its
    `neutral` value such as `n: 1`).
    """
    for name, value in body.items():
        if name in mapped or name in ignored:
            continue
        if any(value == v and type(value) is type(v) for v in _NEUTRAL):
            continue
        if neutral and name in neutral and value == neutral[name]:
            continue
        untranslatable(f"The '{name}' parameter", source=source, target=target, param=name)


# --- streams ---------------------------------------------------------------------------


class StreamEncoder:
    """Writes one client API's stream from neutral events (see translate.stream)."""

    keepalive: bytes

    def start(self, *, id: str, model: str) -> bytes:
        raise NotImplementedError

    def text(self, delta: str) -> bytes:
        raise NotImplementedError

    def tool_call(self, *, call_id: str, name: str) -> bytes:
        raise NotImplementedError

    def tool_arguments(self, fragment: str) -> bytes:
        raise NotImplementedError

    def block_end(self) -> bytes:
        raise NotImplementedError

    def finish(self, stop: StopReason, stop_sequence: str | None = None) -> bytes:
        raise NotImplementedError

    def closing(self, usage: TokenUsage | None) -> bytes:
        """The terminal events, sent once the request is settled."""
        raise NotImplementedError

    def error(self) -> bytes:
        raise NotImplementedError


class StreamDecoder:
    """Reads one upstream API's stream into neutral events for a client encoder.

    What the gateway reads from every decoder: `usage` (what the request is charged),
    `finished` (the stream ended, by its terminal event or a failure), `failed` (the
    upstream reported an error in the stream), `complete` (the answer ended as its API
    says a whole answer ends) and `output_chars` (text and tool-argument characters,
    the fallback estimate when usage is missing).
    """

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.finished = False
        self.failed = False
        self.output_chars = 0
        self._stopped = False  # the upstream said why the answer ended

    @property
    def complete(self) -> bool:
        return not self.failed and (self.finished or self._stopped)

    def feed(self, event: SSEEvent, out: StreamEncoder) -> bytes:
        raise NotImplementedError

    def fail(self) -> bytes:
        """The upstream reported an error in the stream: it ends, as a broken one."""
        self.failed = self.finished = True
        return b""

    def text(self, out: StreamEncoder, text: str) -> bytes:
        self.output_chars += len(text)
        return out.text(text)

    def tool_arguments(self, out: StreamEncoder, fragment: str) -> bytes:
        self.output_chars += len(fragment)
        return out.tool_arguments(fragment)


class ChunkStreamDecoder(StreamDecoder):
    """A stream whose events are each a JSON object (chat, generateContent): an object
    with an `error` reports a failure, and the first chunk starts the answer."""

    def __init__(self) -> None:
        super().__init__()
        self._started = False

    def answer_id(self, chunk: dict[str, Any]) -> str:
        raise NotImplementedError

    def answer_model(self, chunk: dict[str, Any]) -> str:
        raise NotImplementedError

    def feed_chunk(self, chunk: dict[str, Any], out: StreamEncoder) -> bytes:
        raise NotImplementedError

    def feed(self, event: SSEEvent, out: StreamEncoder) -> bytes:
        chunk = event.json()
        if chunk is None:
            return b""
        if "error" in chunk:
            return self.fail()
        if self._started:
            return self.feed_chunk(chunk, out)
        self._started = True
        started = out.start(id=self.answer_id(chunk), model=self.answer_model(chunk))
        return started + self.feed_chunk(chunk, out)


def expect(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """A field's value when it is absent or of the expected type, else a 400.

    The readers map fields into typed shapes: a value of the wrong type is refused here
    rather than passed on to be misread later.
    """
    value = body.get(name)
    if value is not None and not isinstance(value, kinds):
        raise BadRequest(f"{name} must be {what}", param=name)
    return value


def expect_number(body: dict[str, Any], name: str) -> float | int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise BadRequest(f"{name} must be a number", param=name)
    return value


def expect_strings(body: dict[str, Any], name: str, *, single: bool) -> list[str]:
    """A list of strings (or, when `single`, also one string) as a list."""
    value = body.get(name)
    if value is None:
        return []
    if single and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        what = "a string or an array of strings" if single else "an array of strings"
        raise BadRequest(f"{name} must be {what}", param=name)
    return list(value)
