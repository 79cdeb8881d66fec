"""What the gateway needs to know about one client API's wire format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings

from common.exceptions import BadRequest
from llm_proxy.pipeline.sse import PassThroughCodec
from usage.pricing import TokenUsage

if TYPE_CHECKING:
    from llm_proxy.errors import ErrorStyle
    from llm_proxy.pipeline.sse import SSEEvent, StreamCodec


def as_int(value: Any) -> int:
    """A token count from a provider's JSON; anything odd counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def usage_cached_inside(usage: Any, *, input_field: str, output_field: str) -> TokenUsage | None:
    """Usage of OpenAI's APIs, which count cached prompt tokens inside the input count
    (`<input_field>_details.cached_tokens`): split them out, so that the input and the
    cache reads are priced each at their own rate."""
    if not isinstance(usage, dict):
        return None
    prompt = as_int(usage.get(input_field))
    details = usage.get(f"{input_field}_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return TokenUsage(
        input_tokens=prompt - cached,
        output_tokens=as_int(usage.get(output_field)),
        cache_read_tokens=cached,
    )


class CodecState(PassThroughCodec):
    """The state a stream codec keeps for the relay (pipeline.sse.StreamCodec), and what
    an error event from the upstream does to it. The stream is forwarded as it came
    (pipeline.sse.PassThroughCodec)."""

    def __init__(self) -> None:
        super().__init__()
        self.usage: TokenUsage | None = None
        self.finished = False
        self.failed = False

    def _upstream_failed(self) -> bytes:
        """The upstream reported a failure inside its stream: the stream broke, whatever
        follows. The provider's own message is not passed on (it may echo the prompt or
        name internals); error_event() tells the client in its API's shape."""
        self.failed = self.finished = True
        return b""


def delta_members(events: list[SSEEvent]) -> Iterator[Any]:
    """The `delta` member of each event's data; data that is not a JSON object is
    skipped. Codecs parse delivered deltas only here, when a stream broke and what it
    delivered must be priced."""
    for event in events:
        try:
            yield json.loads(event.data).get("delta")
        except (ValueError, AttributeError):
            continue


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


# Token counts are stored as 32-bit integers, and a hold sized for 10^30 output tokens
# would not fit its money column: a larger cap is refused, as providers refuse it.
MAX_OUTPUT_TOKENS = 2**31 - 1


def require_output_cap(body: dict[str, Any], field: str, *, required: bool = False) -> None:
    """`field` (max_tokens, ...) is absent (unless `required`) or a whole number from 1 to
    MAX_OUTPUT_TOKENS."""
    value = body.get(field)
    if value is None and not required:
        return
    require(value is not None, f"{field}: Field required", field)
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{field} must be a positive integer",
        field,
    )
    require(value <= MAX_OUTPUT_TOKENS, f"{field} must be at most {MAX_OUTPUT_TOKENS}", field)


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

    def named_users(self, body: dict[str, Any]) -> list[str]:
        """Every gateway user a request names, read the same way on every endpoint
        (docs/SPEC.md §1): its `user`, then its `metadata.user_id`. The Messages API has
        only the second; clients of the others may send either (OpenAI's Chat and
        Responses bodies carry `metadata` too), so a format that read one field only
        would let a key name another user in the other."""
        metadata = body.get("metadata")
        names = (body.get("user"), metadata.get("user_id") if isinstance(metadata, dict) else None)
        return [name for name in names if isinstance(name, str) and name]

    def named_user(self, body: dict[str, Any]) -> str | None:
        """The user the master key bills: the first the request names."""
        return next(iter(self.named_users(body)), None)

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
