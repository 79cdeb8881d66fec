"""A fake control plane for platform-mode tests (standard library only).

`FakePlatform` serves, on 127.0.0.1 in background threads:

  POST /gateway/provider-keys/resolve   X-Gateway-Token + X-User-Token -> the user and the
                                        attempts the test configured (or a scripted error)
  POST /gateway/usage                   records every report with its correlation id and
                                        answers from a per-call script (status, Retry-After,
                                        delay, or a hang that never answers)
  GET  /                                200 (what the gateway's /health probes)

Every usage POST is recorded with the time it arrived; `accepted()` counts, per
correlation id, the reports the platform answered with a 2xx: the number a real platform
deduplicating by correlation id would have booked.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GATEWAY_TOKEN = "gwt-platform-test-token"


@dataclass(frozen=True)
class Reply:
    """One scripted answer to a usage POST (or a resolve call)."""

    status: int = 200
    body: dict[str, Any] | None = None
    retry_after: str | None = None
    delay_s: float = 0.0
    # Never answer: hold the connection until `release_hangs()`, then close it unanswered.
    hang: bool = False


@dataclass(frozen=True)
class UsagePost:
    at: float  # time.monotonic() on arrival
    correlation_id: str
    body: dict[str, Any]
    headers: dict[str, str]
    status: int | None  # None: never answered (a hang)


def attempt(
    attempt_id: str,
    provider: str,
    model: str,
    *,
    api_base: str | None,
    position: int = 0,
    api_key: str = "sk-platform-managed-key",
) -> dict[str, Any]:
    """One attempt of a resolve answer."""
    return {
        "attempt_id": attempt_id,
        "position": position,
        "provider": provider,
        "model": model,
        "api_key": api_key,
        "api_base": api_base,
        "managed": True,
    }


@dataclass
class FakePlatform:
    token: str = GATEWAY_TOKEN
    # User token -> platform user id; any other token is a 401.
    users: dict[str, str] = field(default_factory=dict)
    # The attempts of the next resolves (each answer gets fresh attempt ids when
    # `fresh_ids` is set, as a real platform would).
    attempts: list[dict[str, Any]] = field(default_factory=list)
    fresh_ids: bool = False
    resolve_script: deque[Reply] = field(default_factory=deque)
    # Answers to usage POSTs, per correlation id first, then in arrival order; 200 after.
    usage_script: deque[Reply] = field(default_factory=deque)
    usage_script_by_id: dict[str, deque[Reply]] = field(default_factory=dict)
    usage_default: Reply = field(default_factory=Reply)
    resolves: list[dict[str, Any]] = field(default_factory=list)
    posts: list[UsagePost] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._resolve_count = 0
        platform = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm and
            # the client's delayed ACK add 40 ms to every answer.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                self._send(Reply(status=200, body={"status": "ok"}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                if headers.get("x-gateway-token") != platform.token:
                    self._send(Reply(status=401, body={"detail": "Invalid gateway token"}))
                    return
                if self.path == "/gateway/provider-keys/resolve":
                    self._send(platform._resolve(body, headers))
                elif self.path == "/gateway/usage":
                    reply = platform._usage_reply(body, headers)
                    if reply.hang:
                        platform._released.wait(timeout=60)
                        self.close_connection = True
                        return
                    self._send(reply)
                else:
                    self._send(Reply(status=404, body={"detail": "no such route"}))

            def _send(self, reply: Reply) -> None:
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = json.dumps(reply.body if reply.body is not None else {}).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if reply.retry_after is not None:
                    self.send_header("Retry-After", reply.retry_after)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakePlatform:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_hangs()
        self._server.shutdown()
        self._server.server_close()

    def release_hangs(self) -> None:
        self._released.set()

    # ---- the two endpoints

    def _resolve(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.resolves.append({"body": body, "headers": headers})
            if self.resolve_script:
                return self.resolve_script.popleft()
            user_id = self.users.get(headers.get("x-user-token", ""))
            if user_id is None:
                return Reply(status=401, body={"detail": "Invalid user token"})
            self._resolve_count += 1
            attempts = [dict(a) for a in self.attempts]
            if self.fresh_ids:
                for a in attempts:
                    a["attempt_id"] = f"{a['attempt_id']}-{self._resolve_count}"
        return Reply(
            body={
                "request_id": f"preq-{self._resolve_count}",
                "user_id": user_id,
                "fallback_enabled": len(attempts) > 1,
                "attempts": attempts,
            }
        )

    def _usage_reply(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        correlation_id = str(body.get("correlation_id"))
        with self._lock:
            script = self.usage_script_by_id.get(correlation_id)
            if script:
                reply = script.popleft()
            elif self.usage_script:
                reply = self.usage_script.popleft()
            else:
                reply = self.usage_default
            self.posts.append(
                UsagePost(
                    at=time.monotonic(),
                    correlation_id=correlation_id,
                    body=body,
                    headers=headers,
                    status=None if reply.hang else reply.status,
                )
            )
        return reply

    # ---- what tests look at

    def posts_for(self, correlation_id: str) -> list[UsagePost]:
        with self._lock:
            return [p for p in self.posts if p.correlation_id == correlation_id]

    def accepted(self) -> Counter[str]:
        """Correlation id -> reports answered with a 2xx."""
        with self._lock:
            return Counter(
                p.correlation_id
                for p in self.posts
                if p.status is not None and 200 <= p.status < 300
            )

    def reports(self) -> dict[str, dict[str, Any]]:
        """Correlation id -> the body of its (last) accepted report."""
        with self._lock:
            return {
                p.correlation_id: p.body
                for p in self.posts
                if p.status is not None and 200 <= p.status < 300
            }

    def wait_accepted(self, count: int, timeout_s: float = 30) -> Counter[str]:
        """Wait until `count` distinct correlation ids were accepted."""
        deadline = time.monotonic() + timeout_s
        while len(self.accepted()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the platform accepted {len(self.accepted())} of {count} reports"
                )
            time.sleep(0.05)
        return self.accepted()
