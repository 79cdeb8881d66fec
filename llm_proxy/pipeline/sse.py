"""Server-sent events: parsing and formatting (docs/SPEC.md §4).

Only this module parses or formats events. What each API's events mean (where its
usage is, which event is terminal, what an error looks like) is a `StreamCodec`'s
business (llm_proxy/formats/, llm_proxy/translate/); forwarding a committed stream and
moving the money at its end is the relay's (llm_proxy.pipeline.relay).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from usage.pricing import TokenUsage


@dataclass(slots=True)
class SSEEvent:
    raw: bytes  # the event as received, with its terminating blank line
    name: str | None  # the `event:` field
    data: bytes  # the `data:` lines, joined with "\n"

    def json(self) -> dict | None:
        try:
            value = json.loads(self.data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def parse_event(raw: bytes) -> SSEEvent:
    name = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return SSEEvent(raw=raw, name=name, data=b"\n".join(data))


def event_type(event: SSEEvent, type_pattern: re.Pattern[bytes]) -> str | None:
    """An event's type: its `event:` field, else the `type` in its data, found by
    `type_pattern` (one group) without parsing the JSON."""
    if event.name is not None:
        return event.name
    match = type_pattern.search(event.data)
    return match.group(1).decode() if match else None


class EventSplitter:
    """Cuts a byte stream into SSE events (a blank line ends an event)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buffer = self._buffer + chunk
        *complete, self._buffer = buffer.split(b"\n\n")
        # Comments (": keepalive") and blank keep-alives carry nothing to forward.
        return [parse_event(raw + b"\n\n") for raw in complete if raw and raw[:1] != b":"]


def format_event(data: dict | str, name: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n".encode()


def with_summary(closing: bytes, summary: dict[str, str]) -> bytes:
    """The closing events of a stream, the last one that reports usage (a chat usage
    chunk, `message_delta`, `response.completed`) carrying the gateway's `summary` as an
    extra top-level member `otari` (docs/ENDPOINTS.md). SDKs keep unknown members.

    The closing events are few and sent once per stream, so re-encoding one costs
    nothing that matters; the events before them pass through untouched.
    """
    events = [event.raw for event in EventSplitter().feed(closing)]
    for index in range(len(events) - 1, -1, -1):
        event = parse_event(events[index])
        data = event.json()
        if data is None:
            continue
        response = data.get("response")
        if "usage" in data or (isinstance(response, dict) and "usage" in response):
            events[index] = format_event({**data, "otari": summary}, event.name)
            return b"".join(events)
    return closing


class StreamCodec(Protocol):
    """One API's stream semantics, as the relay needs them."""

    usage: TokenUsage | None
    # The upstream's terminal event was seen (held back until settlement).
    finished: bool
    # The stream said all it meant to, even if no terminal event came (e.g. a finish
    # reason was sent and the connection then closed cleanly).
    complete: bool
    keepalive: bytes

    def transform(self, event: SSEEvent) -> bytes:
        """The bytes to send the client for this upstream event (b"" to send nothing)."""

    def closing(self) -> bytes:
        """The terminal bytes, sent once the request is settled."""

    def error_event(self) -> bytes:
        """What tells the client the stream failed, in its API's shape."""

    def output_chars(self) -> int:
        """Characters of output delivered so far (to price a stream that broke)."""


class IncompleteStream(Exception):
    """The upstream ended its stream without finishing the answer."""
