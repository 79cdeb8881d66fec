"""A small Redis client for the rate limiter's hot path: one pipelined connection per
event loop, scripts only.

Why not redis-py's asyncio client: measured on the development machine, one EVALSHA
through it costs about 115 us of CPU (connection pool checkout, a timeout task per read,
the reply parsed line by line), and a limited request needs one or two of them. Here
every concurrent request of the process shares one connection: a command is written at
once and its future queued; Redis answers in order, so replies resolve the queue in
order. About half the CPU per command, most of the rest being the socket system calls
(docs/OBSERVABILITY.md has the figures).

Scope, on purpose: `redis://` and `rediss://` (TLS) and `unix://` URLs with an optional
user/password and database number, RESP2 replies, EVALSHA with a fallback to EVAL when
the server does not know the script yet. No cluster redirections, no Sentinel.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse


class RedisError(Exception):
    """The server answered with an error, or could not be reached."""


class RedisUnavailable(RedisError):
    """No connection (refused, lost, timed out, or backing off after a failure)."""


@dataclass(frozen=True)
class RedisURL:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        parts = urlparse(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        query = parse_qs(parts.query)
        db_text = query.get("db", [""])[0] or (
            parts.path.strip("/") if parts.scheme != "unix" else ""
        )
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            path=unquote(parts.path) if parts.scheme == "unix" else None,
            db=int(db_text or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )


# --- the wire format -------------------------------------------------------------------------


def pack(*args: bytes | str | int) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


def parse(buffer: bytes | bytearray, start: int = 0) -> tuple[object, int]:
    """One RESP2 reply from `buffer` at `start`: (value, end). Errors are returned as
    RedisError instances. Raises _Incomplete when the buffer holds less than a reply."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[start : start + 1], bytes(buffer[start + 1 : end])
    after = end + 2
    if kind == b":":
        return int(line), after
    if kind == b"+":
        return line.decode(), after
    if kind == b"-":
        return RedisError(line.decode(errors="replace")), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse(buffer, after)
            items.append(item)
        return items, after
    raise RedisError(f"unexpected reply type {kind!r}")


class _Protocol(asyncio.Protocol):
    """One connection: commands are written as they come, replies resolve the futures
    in the order the commands were sent."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while self.waiters:
            try:
                value, start = parse(self.buffer, start)
            except _Incomplete:
                break
            waiter = self.waiters.popleft()
            # A waiter whose caller timed out is done already: its reply is dropped, and
            # the order of the others is kept.
            if not waiter.done():
                if isinstance(value, RedisError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        if start:
            del self.buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RedisUnavailable("connection lost"))

    def send(self, command: bytes) -> asyncio.Future:
        if self.closed or self.transport is None:
            raise RedisUnavailable("not connected")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(command)
        return waiter


class ScriptClient:
    """Runs Lua scripts on one Redis, from one event loop."""

    def __init__(self, url: str, *, timeout_s: float, retry_after_s: float = 1.0) -> None:
        self.url = RedisURL.parse(url)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._down_until = 0.0

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        url = self.url
        if url.path:
            _, protocol = await loop.create_unix_connection(_Protocol, url.path)
        else:
            context = ssl.create_default_context() if url.tls else None
            _, protocol = await loop.create_connection(_Protocol, url.host, url.port, ssl=context)
        setup = []
        if url.password:
            auth = ("AUTH", url.username, url.password) if url.username else ("AUTH", url.password)
            setup.append(protocol.send(pack(*auth)))
        if url.db:
            setup.append(protocol.send(pack("SELECT", url.db)))
        for reply in setup:
            await reply
        return protocol

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if time.monotonic() < self._down_until:
            # Do not try to connect on every request while Redis is down.
            raise RedisUnavailable("backing off after a failure")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        except (TimeoutError, OSError, RedisError) as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._protocol = protocol
        return protocol

    async def evalsha(self, script: Script, keys: list[str], args: list[int]) -> object:
        """Run `script`; loads it on the server when it does not know it yet."""
        try:
            async with asyncio.timeout(self.timeout_s):
                protocol = await self._connection()
                command = pack("EVALSHA", script.sha, len(keys), *keys, *args)
                try:
                    return await protocol.send(command)
                except RedisError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    return await protocol.send(pack("EVAL", script.text, len(keys), *keys, *args))
        except TimeoutError as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            # The connection may be stuck: start afresh next time.
            if self._protocol is not None and self._protocol.transport is not None:
                self._protocol.transport.close()
            self._protocol = None
            raise RedisUnavailable("timed out") from exc


class Script:
    """A Lua script and its SHA-1, by which Redis knows it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id
