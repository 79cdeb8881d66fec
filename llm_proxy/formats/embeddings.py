"""OpenAI embeddings (`POST /v1/embeddings`): priced on input tokens, never streamed."""

from __future__ import annotations

from typing import Any

from llm_proxy.formats.base import ApiFormat, as_int, require
from usage.pricing import TokenUsage

# An input given as token ids is estimated at four characters a token, the inverse of
# the estimate's one token per four characters.
_CHARS_PER_TOKEN = 4


def _inputs(body: dict[str, Any]) -> list[Any]:
    """The input as a list of items: strings, or lists of token ids."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(_is_token(t) for t in raw):
        return [raw]
    return list(raw) if isinstance(raw, list) else []


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class EmbeddingsFormat(ApiFormat):
    name = "embeddings"
    endpoint = "/v1/embeddings"
    error_style = "openai"

    def validate(self, body: dict[str, Any]) -> None:
        raw = body.get("input")
        require(
            (isinstance(raw, str) and bool(raw)) or (isinstance(raw, list) and bool(raw)),
            "input must be a non-empty string or array",
            "input",
        )
        for item in _inputs(body):
            require(
                (isinstance(item, str) and bool(item))
                or (isinstance(item, list) and bool(item) and all(_is_token(t) for t in item)),
                "each input must be a non-empty string or array of token ids",
                "input",
            )
        require(
            body.get("stream") in (None, False),
            "embeddings are not streamed",
            "stream",
        )

    def prompt_texts(self, body: dict[str, Any]) -> list[str]:
        return [item for item in _inputs(body) if isinstance(item, str)]

    def prompt_chars(self, body: dict[str, Any], texts: list[str] | None = None) -> int:
        tokens = sum(len(item) for item in _inputs(body) if isinstance(item, list))
        return super().prompt_chars(body, texts) + tokens * _CHARS_PER_TOKEN

    def output_token_budget(self, body: dict[str, Any]) -> int:
        # An embedding has no output tokens: the hold is the input's estimate alone.
        return 0

    def usage_from_body(self, body: dict[str, Any]) -> TokenUsage | None:
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return None
        return TokenUsage(input_tokens=as_int(usage.get("prompt_tokens")))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        return 0
