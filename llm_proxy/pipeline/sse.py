"""Server-sent events: parsing and formatting (docs/SPEC.md §4).

Only this module parses or formats events. What each API's events mean (where its
usage is, which event is terminal, what an error looks like) is a `StreamCodec`'s
business (llm_proxy/formats/, llm_proxy/translate/); forwarding a committed stream and
moving the money at its end is the relay's (llm_proxy.pipeline.relay).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from usage.pricing import TokenUsage

logger = logging.getLogger(__name__)


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


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


def dispatched(raw: bytes) -> bool:
    """Whether an SSE client dispatches the event `raw`: only one with a data line does.
    Comments (": keepalive"), blank keep-alives and a comment after a blank line carry
    nothing, and are not forwarded."""
    return raw.startswith(b"data:") or b"\ndata:" in raw


def split_events(run: bytes) -> list[SSEEvent]:
    """The events of `run`: complete events (it ends with a blank line) with `\\n` line
    ends. Those that carry nothing (`dispatched`) are left out."""
    return [parse_event(raw + b"\n\n") for raw in run.split(b"\n\n")[:-1] if dispatched(raw)]


def well_formed(data: bytes) -> bool:
    """Whether an event's data is one an API relayed can send: a JSON object (checked by
    shape, not parsed), or chat's `[DONE]`."""
    if data == b"[DONE]":
        return True
    if data[:1] != b"{" or data.rstrip()[-1:] != b"}":
        return False
    return data.isascii() or _utf8(data)


# A line that is no line of a well-formed event (a one-line JSON object or `[DONE]` as
# data, an event name, an id, a retry, a comment, a blank line): a cheap screen of a whole
# run, in C. A run it flags is checked event by event (`well_formed`), which also accepts
# an object cut over several data lines.
_SUSPECT_LINE = re.compile(
    rb"^(?!data: ?(?:\{.*\}[ \t]*|\[DONE\])$|event:|id:|retry:|:|$)", re.MULTILINE
)


class EventSplitter:
    """Cuts a byte stream into SSE events (a blank line ends an event).

    It also drops what is no event of any API relayed (`well_formed`): a broken server
    or proxy can send anything (broken JSON, bytes that are not UTF-8, lines with no
    field), and passed through, it would break the client's SDK mid-answer. A clean run
    costs one regular-expression scan (and a UTF-8 check when it is not ASCII).
    """

    def __init__(self) -> None:
        self._buffer = b""
        # Events dropped so far (logged once per stream).
        self.dropped = 0

    def complete(self, chunk: bytes) -> bytes:
        """The complete events that `chunk` adds to what came before it, as one run of
        bytes with `\\n` line ends (b"" while an event is still incomplete); the rest is
        kept for the next chunk."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # On the whole buffer, so that a CRLF cut between two chunks is seen too.
            buffer = buffer.replace(b"\r\n", b"\n")
        last = buffer.rfind(b"\n\n")
        if last < 0:
            self._buffer = buffer
            return b""
        # Where bytes.split(b"\n\n") cuts: pairs from the left of a run of newlines, so
        # an odd run leaves one newline to the next event.
        start = last
        while start and buffer[start - 1] == 10:
            start -= 1
        end = start + (last + 2 - start) // 2 * 2
        self._buffer = buffer[end:]
        return self._clean(buffer[:end])

    def _clean(self, run: bytes) -> bytes:
        if _SUSPECT_LINE.search(run) is None and (run.isascii() or _utf8(run)):
            return run
        kept: list[bytes] = []
        dropped = 0
        for piece in run.split(b"\n\n")[:-1]:
            if dispatched(piece) and well_formed(parse_event(piece + b"\n\n").data):
                kept.append(piece)
            elif _SUSPECT_LINE.search(piece) is not None or dispatched(piece):
                dropped += 1  # not merely a comment or a blank line, which carry nothing
        if dropped:
            if not self.dropped:
                logger.warning("the provider sent data that is no event; dropped")
            self.dropped += dropped
        return b"".join(piece + b"\n\n" for piece in kept)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return split_events(self.complete(chunk))


class PassThroughCodec:
    """The base of a codec whose stream reaches the client as the provider sent it (the
    client speaks the provider's API): events are not parsed one by one.

    Each run of complete events is searched once for `special`, a pattern that finds
    whatever the codec must look at (its usage, its terminal event, errors). The events
    before the first match go out as they came, in one piece; the event the match is in
    is parsed and handed to `transform`, and the search goes on after it. So in a stream
    of text deltas only the few events that carry usage or end the stream are parsed.
    A match that turns out to be nothing (the pattern is cheap, not exact) costs only
    that event's parse. Comments and blank lines (`FRAMING`) are found the same way and
    looked at event by event: what carries nothing is not forwarded (`dispatched`).
    """

    # What the codec must see event by event; a subclass adds its own to FRAMING.
    special: ClassVar[re.Pattern[bytes]]
    # A comment line, or a run of three newlines (a blank event): bytes.split's cut of
    # such a run is found event by event.
    FRAMING = rb"\n:|\n\n\n"

    finished: bool

    def __init__(self) -> None:
        self._splitter = EventSplitter()
        # The events forwarded as they came, in runs: what the client was sent, read
        # again only if it must be priced (output_chars).
        self._delivered: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for the next piece of the upstream stream (b""
        to send nothing). Nothing after the terminal event is sent."""
        run = self._splitter.complete(chunk)
        out: list[bytes] = []
        pos, end = 0, len(run)
        while pos < end and not self.finished:
            if run[pos] in b"\n:":
                # A blank line or a comment where an event starts.
                verbatim_end = pos
            else:
                match = self.special.search(run, pos)
                if match is None:
                    verbatim_end = end
                else:
                    # The event the match is in starts after the last boundary before
                    # it (a comment's newline is the boundary's second).
                    boundary = run.rfind(b"\n\n", pos, match.start() + 1)
                    verbatim_end = pos if boundary < 0 else boundary + 2
            if verbatim_end > pos:
                verbatim = run[pos:verbatim_end]
                self._delivered.append(verbatim)
                self.forwarded(verbatim)
                out.append(verbatim)
                pos = verbatim_end
                continue
            boundary = run.find(b"\n\n", pos)
            raw = run[pos:boundary]
            pos = boundary + 2
            if dispatched(raw):
                out.append(self.transform(parse_event(raw + b"\n\n")))
        return b"".join(out)

    def forwarded(self, events: bytes) -> None:
        """Note what a run of events forwarded as it came says in bulk (e.g. a finish
        reason); `events` holds no `special` match."""

    def transform(self, event: SSEEvent) -> bytes:
        """The bytes to send for an event that `special` matched (b"" to send nothing).
        An event it returns as it came (`event.raw`) must go through `deliver`."""
        raise NotImplementedError

    def deliver(self, event: SSEEvent) -> bytes:
        """`event`, forwarded as it came."""
        self._delivered.append(event.raw)
        return event.raw

    def delivered_events(self) -> list[SSEEvent]:
        """Every event forwarded as it came, parsed (to price a stream that broke)."""
        return split_events(b"".join(self._delivered))


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

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for this piece of the upstream stream (b"" to
        send nothing)."""

    def closing(self) -> bytes:
        """The terminal bytes, sent once the request is settled."""

    def error_event(self) -> bytes:
        """What tells the client the stream failed, in its API's shape."""

    def output_chars(self) -> int:
        """Characters of output delivered so far (to price a stream that broke)."""


class IncompleteStream(Exception):
    """The upstream ended its stream without finishing the answer."""
