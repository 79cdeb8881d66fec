"""Requests and stream reading for the three generation APIs, shared by the endpoint tests."""

from __future__ import annotations

import json
from typing import Any

PROMPT = "Say hello to the test suite"
PATHS = {
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}
APIS = tuple(PATHS)
# Provider instances of tests/conftest.py, by kind: normal, short timeout, closed port.
INSTANCES = {
    "openai": {"ok": "openai", "short": "short", "dead": "dead"},
    "anthropic": {"ok": "anthropic", "short": "anthropic-short", "dead": "anthropic-dead"},
}


def body_for(api: str, model: str, *, stream: bool = False, max_tokens: int = 64) -> dict:
    """The same one-line question in each API's shape."""
    if api == "chat":
        return {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    if api == "messages":
        return {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": stream,
        }
    return {"model": model, "input": PROMPT, "max_output_tokens": max_tokens, "stream": stream}


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body; comments skipped."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def stream_error(api: str, text: str) -> dict | None:
    """The mid-stream error event of an SSE body in `api`'s shape, if there is one."""
    for name, data in sse_events(text):
        if api == "chat" and data.startswith('{"error"'):
            return json.loads(data)
        if api != "chat" and name == "error":
            return json.loads(data)
    return None


def error_shape_ok(api: str, body: dict) -> bool:
    """An HTTP error body in the wire shape of `api` (docs/SPEC.md §2)."""
    if api == "messages":
        return body.get("type") == "error" and isinstance(body["error"].get("message"), str)
    return isinstance(body.get("error"), dict) and {"message", "type", "code", "param"} <= set(
        body["error"]
    )


def text_of(api: str, body: dict[str, Any]) -> str:
    """The answer's text in a non-streamed body of `api`."""
    if api == "chat":
        return body["choices"][0]["message"]["content"] or ""
    if api == "messages":
        return "".join(b["text"] for b in body["content"] if b["type"] == "text")
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


# Anthropic's error type for each status (docs/SPEC.md §2); any other status is api_error.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def assert_error_shape(api: str, status: int, body: object) -> dict:
    """An HTTP error body exactly in the wire shape of `api` for `status` (docs/SPEC.md §2),
    the one the official SDKs parse into their typed errors. Returns the inner error."""
    assert isinstance(body, dict), body
    error = body.get("error")
    assert isinstance(error, dict), body
    assert isinstance(error.get("message"), str), body
    assert error["message"], body
    if api == "messages":
        assert body["type"] == "error", body
        assert error["type"] == ANTHROPIC_ERROR_TYPES.get(status, "api_error"), (status, body)
    else:
        assert {"message", "type", "param", "code"} <= set(error), body
        assert isinstance(error["type"], str), body
        assert error["code"] is None or isinstance(error["code"], str), body
    return error
