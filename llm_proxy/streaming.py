"""Server-sent events: parsing and formatting, and the relay that forwards a provider's
stream to the client while keeping the books (docs/SPEC.md §4).

The relay forwards events as they arrive. What each API's events mean (where its usage
is, which event is terminal, what an error looks like) is a `StreamCodec`'s business
(llm_proxy/formats/). The relay only decides *when* the money moves:

- before the terminal event goes out: settle, then send it (SDKs stop reading at the
  terminal event and hang up, so settling afterwards would race the disconnect);
- when the upstream breaks mid-stream: charge what was delivered, send an error event;
- when the client goes away: charge what was delivered, close the upstream, re-raise.

Settlement is shielded from cancellation (llm_proxy.gateway.Exchange), because Django
cancels the response task the moment the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx

if TYPE_CHECKING:
    from llm_proxy.gateway import Exchange
    from usage.pricing import TokenUsage

logger = logging.getLogger(__name__)


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


class _Tick:
    """Marker: the provider has been silent for the keepalive interval."""


KEEPALIVE_TICK = _Tick()


async def with_keepalive(
    chunks: AsyncIterator[bytes], interval_s: float
) -> AsyncIterator[bytes | _Tick]:
    """Yield the upstream's chunks, and a tick whenever it is silent for `interval_s`.

    The pending read is never cancelled by a tick (that would break the upstream
    stream); it is awaited again. Interval 0 turns keepalives off.
    """
    if interval_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    while True:
        step = asyncio.ensure_future(anext(chunks))
        try:
            while not (await asyncio.wait({step}, timeout=interval_s))[0]:
                yield KEEPALIVE_TICK
        finally:
            if not step.done():
                step.cancel()
        try:
            yield step.result()
        except StopAsyncIteration:
            return


class IncompleteStream(Exception):
    """The upstream ended its stream without finishing the answer."""


async def relay(
    *,
    exchange: Exchange,
    upstream: httpx.Response,
    chunks: AsyncIterator[bytes],
    first_chunk: bytes,
    codec: StreamCodec,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    """The response body of a committed stream. See the module docstring."""
    splitter = EventSplitter()
    try:
        try:
            out = b"".join(codec.transform(event) for event in splitter.feed(first_chunk))
            if out:
                yield out
            if not codec.finished:
                async for chunk in with_keepalive(chunks, keepalive_s):
                    if chunk is KEEPALIVE_TICK:
                        yield codec.keepalive
                        continue
                    out = b"".join(codec.transform(event) for event in splitter.feed(chunk))
                    if out:
                        yield out
                    if codec.finished:
                        break
            if not codec.complete:
                raise IncompleteStream
        except Exception as exc:
            # A broken upstream (httpx errors, IncompleteStream) or a bug of ours: either
            # way the client has part of an answer, and that part is charged.
            if not isinstance(exc, httpx.HTTPError | IncompleteStream):
                logger.exception("request %s: relay failed", exchange.request_id)
            logger.warning(
                "request %s: upstream stream broke: %s", exchange.request_id, type(exc).__name__
            )
            await exchange.settle_broken_stream(codec)
            yield codec.error_event()
            return
        await exchange.settle_stream(codec)
        yield with_summary(codec.closing(), exchange.closing_summary())
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Charge what it was sent; the upstream is closed below.
        await exchange.settle_disconnected(codec)
        raise
    finally:
        await upstream.aclose()
