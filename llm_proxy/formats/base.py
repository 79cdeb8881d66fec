"""What the gateway needs to know about one client API's wire format."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings

from otari.exceptions import BadRequest

if TYPE_CHECKING:
    from llm_proxy.errors import ErrorStyle
    from llm_proxy.pipeline.sse import SSEEvent, StreamCodec
    from usage.pricing import TokenUsage


def as_int(value: Any) -> int:
    """A token count from a provider's JSON; anything odd counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def text_length(content: Any) -> int:
    """Characters of text in a message content: a string or a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    return 0


def require(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise BadRequest(message, param=param)


class ApiFormat:
    """One client API: request validation, pricing inputs, usage, stream codec."""

    name: ClassVar[str]  # "chat", "messages", "responses", "embeddings"
    endpoint: ClassVar[str]  # as recorded in the usage log
    error_style: ClassVar[ErrorStyle]
    max_output_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def prompt_texts(self, body: dict[str, Any]) -> list[str]:
        """The request's prompt text, piece by piece (for the estimate and redaction)."""
        raise NotImplementedError

    def prompt_chars(self, body: dict[str, Any], texts: list[str] | None = None) -> int:
        """Characters the estimate counts (`texts`: prompt_texts(body), if already known)."""
        if texts is None:
            texts = self.prompt_texts(body)
        return sum(len(text) for text in texts)

    def max_output_tokens(self, body: dict[str, Any]) -> int | None:
        for field in self.max_output_fields:
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def output_token_budget(self, body: dict[str, Any]) -> int:
        """The output tokens the hold provides for: the request's cap, else the default."""
        return self.max_output_tokens(body) or settings.OTARI_DEFAULT_MAX_OUTPUT_TOKENS

    def named_user(self, body: dict[str, Any]) -> str | None:
        """The gateway user a request names (required with the master key)."""
        user = body.get("user")
        return user if isinstance(user, str) and user else None

    def upstream_body(self, body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
        """The body as the provider gets it: unchanged but for the model name."""
        return {**body, "model": model}

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        raise NotImplementedError

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        raise NotImplementedError

    def stream_codec(self, request: dict[str, Any]) -> StreamCodec:
        """The codec of a stream answering `request` (the client's body)."""
        raise NotImplementedError

    def is_stream_error(self, event: SSEEvent) -> bool:
        """Whether an upstream event of this API reports a failure (some servers answer
        200 and put their error in the stream)."""
        return False
