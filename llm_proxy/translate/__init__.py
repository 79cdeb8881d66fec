"""Translation between the client APIs and the provider APIs (docs/TRANSLATION.md).

Each request takes a `Route`: native when its provider speaks the client's API, else a
translation to an API the provider does speak. A translated request is read into the
neutral shapes of translate.ir and written out in the upstream's API; the answer (or
its stream) goes the other way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings

from common.exceptions import BadRequest
from llm_proxy.formats import FORMATS
from llm_proxy.formats.chat import usage_requested
from llm_proxy.pipeline.sse import EventSplitter
from llm_proxy.translate import chat, converse, gemini, messages, responses
from llm_proxy.translate.ir import API_TITLES, TranslationError

if TYPE_CHECKING:
    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.pipeline.sse import SSEEvent, StreamCodec
    from llm_proxy.providers.base import Provider
    from llm_proxy.translate.ir import Completion, Conversation, StreamDecoder, StreamEncoder
    from usage.pricing import TokenUsage

__all__ = ["Route", "TranslationError", "route_for"]

# Which upstream API serves a client API on a provider that does not speak it, in order
# of preference (chat first for Responses: it keeps structured output and reasoning
# effort, which the Messages API cannot express).
# APIs only providers speak (bedrock's Converse; generateContent of gemini and vertex):
# every client API reaches them translated.
_UPSTREAM_ONLY: dict[str, ApiFormat] = {converse.API: converse.FORMAT, gemini.API: gemini.FORMAT}
FALLBACKS: dict[str, tuple[str, ...]] = {
    "chat": ("messages", *_UPSTREAM_ONLY),
    "messages": ("chat", *_UPSTREAM_ONLY),
    "responses": ("chat", "messages", *_UPSTREAM_ONLY),
    "embeddings": (),
}

_READERS: dict[str, Callable[[dict[str, Any], str], Conversation]] = {
    "chat": chat.read_request,
    "messages": messages.read_request,
    "responses": responses.read_request,
}


def _write_chat(conversation: Conversation, model: str) -> dict[str, Any]:
    return chat.write_request(conversation, model)


def _write_messages(conversation: Conversation, model: str) -> dict[str, Any]:
    return messages.write_request(
        conversation, model, default_max_tokens=settings.OTARI_DEFAULT_MAX_OUTPUT_TOKENS
    )


_WRITERS: dict[str, Callable[[Conversation, str], dict[str, Any]]] = {
    "chat": _write_chat,
    "messages": _write_messages,
    converse.API: converse.write_request,
    gemini.API: gemini.write_request,
}
_RESPONSE_READERS: dict[str, Callable[[dict[str, Any]], Completion]] = {
    "chat": chat.read_response,
    "messages": messages.read_response,
    converse.API: converse.read_response,
    gemini.API: gemini.read_response,
}
# Stream decoders by upstream API, given the provider's model the request was sent to
# (Converse streams do not name their model).
_DECODERS: dict[str, Callable[[str], StreamDecoder]] = {
    "chat": lambda _model: chat.ChatStreamDecoder(),
    "messages": lambda _model: messages.MessagesStreamDecoder(),
    converse.API: converse.ConverseStreamDecoder,
    gemini.API: gemini.GeminiStreamDecoder,
}


def _now() -> int:
    """The `created` timestamp of a translated answer (a seam for the golden tests)."""
    return int(time.time())


def _render(client: str, completion: Completion, request: dict[str, Any]) -> dict[str, Any]:
    created = _now()
    if client == "chat":
        return chat.write_response(completion, created=created)
    if client == "messages":
        return messages.write_response(completion)
    return responses.write_response(completion, request=request, created=created)


def _encoder(client: str, request: dict[str, Any]) -> StreamEncoder:
    created = _now()
    if client == "chat":
        return chat.ChatStreamEncoder(created=created, include_usage=usage_requested(request))
    if client == "messages":
        return messages.MessagesStreamEncoder()
    return responses.ResponsesStreamEncoder(request=request, created=created)


class TranslatingCodec:
    """A StreamCodec for a translated stream: an upstream decoder feeding a client
    encoder. Usage and completeness are the upstream's (what the request is charged);
    keepalives, the terminal events and the error event are the client's."""

    def __init__(self, decoder: StreamDecoder, encoder: StreamEncoder) -> None:
        self.decoder = decoder
        self.encoder = encoder
        self.keepalive = encoder.keepalive
        self._splitter = EventSplitter()

    @property
    def usage(self) -> TokenUsage | None:
        return self.decoder.usage

    @property
    def finished(self) -> bool:
        return self.decoder.finished

    @property
    def complete(self) -> bool:
        return self.decoder.complete

    def feed(self, chunk: bytes) -> bytes:
        # Translation reads every event: each is parsed and written anew.
        return b"".join(self.transform(event) for event in self._splitter.feed(chunk))

    def transform(self, event: SSEEvent) -> bytes:
        return self.decoder.feed(event, self.encoder)

    def closing(self) -> bytes:
        return self.encoder.closing(self.decoder.usage)

    def error_event(self) -> bytes:
        return self.encoder.error()

    def output_chars(self) -> int:
        return self.decoder.output_chars


class Route:
    """How a request in API `client` reaches a provider that speaks API `upstream`."""

    def __init__(self, client: ApiFormat, upstream: ApiFormat) -> None:
        self.client = client
        self.upstream = upstream
        self.translated = client.name != upstream.name

    def __repr__(self) -> str:
        return f"<Route {self.client.name} -> {self.upstream.name}>"

    def upstream_body(self, body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
        """The provider's request body; raises BadRequest for what cannot be translated."""
        if not self.translated:
            return self.client.upstream_body(body, model, stream)
        conversation = _READERS[self.client.name](body, self.upstream.name)
        return _WRITERS[self.upstream.name](conversation, model)

    def response_body(
        self, request: dict[str, Any], answer: dict[str, Any], model: str = ""
    ) -> dict[str, Any]:
        """A translated route's answer in the client's API; raises TranslationError for
        an answer the client's API cannot carry. `model`: the provider's model the
        request was sent to, named in the answer when the upstream's answer names none."""
        completion = _RESPONSE_READERS[self.upstream.name](answer)
        completion.model = completion.model or model
        return _render(self.client.name, completion, request)

    def stream_codec(self, request: dict[str, Any], model: str = "") -> StreamCodec:
        if not self.translated:
            return self.client.stream_codec(request)
        decoder = _DECODERS[self.upstream.name](model)
        return TranslatingCodec(decoder, _encoder(self.client.name, request))


_ROUTES: dict[tuple[str, str], Route] = {}


def route_for(fmt: ApiFormat, provider: Provider) -> Route:
    """The route of an `fmt` request to `provider`, or a 400 when there is none."""
    for api in (fmt.name, *FALLBACKS.get(fmt.name, ())):
        if api in provider.apis:
            key = (fmt.name, api)
            if key not in _ROUTES:
                _ROUTES[key] = Route(fmt, _UPSTREAM_ONLY.get(api) or FORMATS[api])
            return _ROUTES[key]
    raise BadRequest(
        f"Provider '{provider.name}' ({provider.kind} kind) has no {API_TITLES[fmt.name]} "
        "API, and the gateway cannot translate this endpoint to one it has",
        code="unsupported_endpoint",
        param="model",
    )
