"""A fake of the cloud providers' wire formats on loopback: AWS Bedrock (Converse and
ConverseStream), Google's Gemini API and Vertex AI (generateContent and
streamGenerateContent), and Google's OAuth token endpoint.

It checks what the real services check and answers as they do:

- Bedrock: every request must carry a valid SigV4 signature, recomputed here with
  botocore from the known test credentials (scope, signed headers, body hash, a clock
  skew under five minutes); ConverseStream answers in AWS's binary event-stream frames,
  encoded here (prelude, headers, payload, both CRC32s).
- Gemini: the `x-goog-api-key` header must hold the test key.
- Vertex: the bearer token must be one the fake token endpoint issued; the endpoint
  itself verifies the service account's RS256 JWT assertion against the test public key.

Behaviour is selected by substrings of the model name, as in tests/fake_provider.py:
  fail-<status>   that status with the service's error body (429: Bedrock adds
                  `Retry-After: 7`; Google puts `"retryDelay": "7s"` in the body)
  midstream       a stream: the start and two text deltas, then a TCP close
  errorfirst      a stream whose first event is an error (a Bedrock exception frame,
                  a Google error object)
  cached-<n>      n cache-read prompt tokens;  cachewrite-<n>: n cache writes (Bedrock)
  tools           one call of `get_weather` with {"city": "Paris"}
  slow            a stream with 0.3 s between chunks (`aborted_by_client` counts the
                  streams the gateway closed before their end)

Usage is fixed: INPUT_TOKENS uncached prompt tokens, OUTPUT_TOKENS output tokens (Gemini:
CANDIDATE_TOKENS + THOUGHT_TOKENS, with a thought part the gateway must not show).
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

WORDS = ("Hello", " from", " the", " cloud")
TEXT = "".join(WORDS)
INPUT_TOKENS = 21
OUTPUT_TOKENS = 9
CANDIDATE_TOKENS = 6
THOUGHT_TOKENS = 3  # Gemini: CANDIDATE_TOKENS + THOUGHT_TOKENS = OUTPUT_TOKENS

AWS_ACCESS_KEY = "AKIDFAKETESTKEY00001"
AWS_SECRET_KEY = "fake-test-secret-key-for-sigv4-verification"
AWS_REGION = "us-test-1"
GEMINI_API_KEY = "fake-gemini-api-key-0123456789"
TOOL_ARGUMENTS = {"city": "Paris"}


# --- the event-stream encoding ----------------------------------------------------------


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32), headers
    (name length, name, type 7 = string, value length, value), payload, CRC32 of all."""
    encoded = b""
    for name, value in headers.items():
        raw = value.encode()
        encoded += struct.pack("B", len(name)) + name.encode() + b"\x07"
        encoded += struct.pack(">H", len(raw)) + raw
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def bedrock_event(event_type: str, payload: dict[str, Any]) -> bytes:
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return event_frame(headers, json.dumps(payload).encode())


def bedrock_exception(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return event_frame(headers, json.dumps({"message": message}).encode())


# --- behaviours ---------------------------------------------------------------------------


@dataclass
class Behaviour:
    fail: int | None = None
    midstream: bool = False
    errorfirst: bool = False
    cached: int = 0
    cachewrite: int = 0
    tools: bool = False
    slow: bool = False

    @classmethod
    def from_model(cls, model: str) -> Behaviour:
        def number(name: str) -> int:
            match = re.search(rf"{name}-(\d+)", model)
            return int(match.group(1)) if match else 0

        return cls(
            fail=number("fail") or None,
            midstream="midstream" in model,
            errorfirst="errorfirst" in model,
            cached=number("cached"),
            cachewrite=number("cachewrite"),
            tools="tools" in model,
            slow="slow" in model,
        )


@dataclass
class Recorded:
    kind: str  # "bedrock", "gemini", "vertex", "token"
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    # Close the connection after the chunks, without ending the body.
    drop: bool = False
    # Seconds between chunks (None: the fake's default).
    pause_s: float | None = None


def _json(status: int, body: Any, **headers: str) -> Reply:
    return Reply(
        status, {"content-type": "application/json", **headers}, [json.dumps(body).encode()]
    )


class _Dropped(Exception):
    """Raised inside the ASGI app to make uvicorn abort the connection mid-body."""


# --- Bedrock --------------------------------------------------------------------------------


def _sigv4_failure(method: str, url: str, headers: dict[str, str], content: bytes) -> str | None:
    """Why the request's SigV4 signature is wrong, or None when it is right."""
    auth = headers.get("authorization", "")
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})",
        auth,
    )
    if match is None:
        return "missing or malformed Authorization header"
    access_key, day, region, service, signed_headers, signature = match.groups()
    if (access_key, region, service) != (AWS_ACCESS_KEY, AWS_REGION, "bedrock"):
        return f"wrong credential scope {access_key}/{region}/{service}"
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "missing X-Amz-Date"
    if stamp[:8] != day or abs(time.time() - signed_at.timestamp()) > 300:
        return "signature expired or scoped to another day"
    names = signed_headers.split(";")
    if not {"host", "x-amz-date"} <= set(names):
        return "host and x-amz-date must be signed"
    request = AWSRequest(
        method=method, url=url, data=content, headers={name: headers[name] for name in names}
    )
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(AWS_ACCESS_KEY, AWS_SECRET_KEY), "bedrock", AWS_REGION)
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    return None if expected == signature else "signature mismatch"


def _bedrock(
    model: str, stream: bool, behaviour: Behaviour, words: tuple[str, ...] = WORDS
) -> Reply:
    if behaviour.fail:
        status = behaviour.fail
        error = {429: "ThrottlingException", 400: "ValidationException"}.get(
            status, "InternalServerException"
        )
        extra = {"retry-after": "7"} if status == 429 else {}
        return _json(
            status,
            {"message": f"{error}: the fake says {status}"},
            **{"x-amzn-errortype": f"{error}:http://internal.amazon.com/coral/", **extra},
        )
    usage = {
        "inputTokens": INPUT_TOKENS,
        "outputTokens": OUTPUT_TOKENS,
        "totalTokens": INPUT_TOKENS + OUTPUT_TOKENS + behaviour.cached + behaviour.cachewrite,
        "cacheReadInputTokens": behaviour.cached,
        "cacheWriteInputTokens": behaviour.cachewrite,
    }
    stop = "tool_use" if behaviour.tools else "end_turn"
    if not stream:
        content: list[dict[str, Any]] = [{"reasoningContent": {"reasoningText": {"text": "…"}}}]
        if behaviour.tools:
            content.append(
                {
                    "toolUse": {
                        "toolUseId": "tooluse_1",
                        "name": "get_weather",
                        "input": TOOL_ARGUMENTS,
                    }
                }
            )
        else:
            content.append({"text": "".join(words)})
        return _json(
            200,
            {
                "output": {"message": {"role": "assistant", "content": content}},
                "stopReason": stop,
                "usage": usage,
                "metrics": {"latencyMs": 12},
            },
        )
    if behaviour.errorfirst:
        frames = [bedrock_exception("modelStreamErrorException", "the model failed")]
        return Reply(200, {"content-type": "application/vnd.amazon.eventstream"}, frames)
    frames = [bedrock_event("messageStart", {"role": "assistant"})]
    if behaviour.tools:
        frames.append(
            bedrock_event(
                "contentBlockStart",
                {
                    "start": {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather"}},
                    "contentBlockIndex": 0,
                },
            )
        )
        arguments = json.dumps(TOOL_ARGUMENTS)
        for piece in (arguments[:5], arguments[5:]):
            frames.append(
                bedrock_event(
                    "contentBlockDelta",
                    {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": 0},
                )
            )
    else:
        for word in words:
            frames.append(
                bedrock_event(
                    "contentBlockDelta", {"delta": {"text": word}, "contentBlockIndex": 0}
                )
            )
    if behaviour.midstream:
        return Reply(
            200, {"content-type": "application/vnd.amazon.eventstream"}, frames[:3], drop=True
        )
    frames.append(bedrock_event("contentBlockStop", {"contentBlockIndex": 0}))
    frames.append(bedrock_event("messageStop", {"stopReason": stop}))
    frames.append(bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
    # Split frames across chunk boundaries, as TCP may: the parser must reassemble them.
    data = b"".join(frames)
    cuts = [0, 7, len(data) // 2, len(data) // 2 + 3, len(data)]
    if behaviour.slow:
        return Reply(
            200, {"content-type": "application/vnd.amazon.eventstream"}, frames, pause_s=0.3
        )
    return Reply(
        200,
        {"content-type": "application/vnd.amazon.eventstream"},
        [data[a:b] for a, b in itertools.pairwise(cuts)],
    )


# --- Gemini and Vertex ------------------------------------------------------------------------


def _google_error(status: int) -> Reply:
    names = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }
    error: dict[str, Any] = {
        "code": status,
        "message": f"The fake says {status}",
        "status": names.get(status, "UNKNOWN"),
    }
    if status == 429:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
        ]
    return _json(status, {"error": error})


def _gemini(
    model: str, stream: bool, behaviour: Behaviour, words: tuple[str, ...] = WORDS
) -> Reply:
    if behaviour.fail:
        return _google_error(behaviour.fail)
    usage = {
        "promptTokenCount": INPUT_TOKENS + behaviour.cached,
        "candidatesTokenCount": CANDIDATE_TOKENS,
        "thoughtsTokenCount": THOUGHT_TOKENS,
        "totalTokenCount": INPUT_TOKENS + behaviour.cached + OUTPUT_TOKENS,
    }
    if behaviour.cached:
        usage["cachedContentTokenCount"] = behaviour.cached
    answer = {"responseId": "resp-fake-1", "modelVersion": model}
    thought = {"text": "Let me think.", "thought": True}
    if behaviour.tools:
        parts: list[dict[str, Any]] = [
            thought,
            {"functionCall": {"name": "get_weather", "args": TOOL_ARGUMENTS}},
        ]
    else:
        parts = [thought, {"text": "".join(words)}]
    if not stream:
        return _json(
            200,
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": parts},
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": usage,
                **answer,
            },
        )
    sse = {"content-type": "text/event-stream"}

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"

    if behaviour.errorfirst:
        return Reply(
            200, sse, [event({"error": {"code": 500, "message": "boom", "status": "INTERNAL"}})]
        )
    running = {
        "promptTokenCount": usage["promptTokenCount"],
        "totalTokenCount": usage["promptTokenCount"],
    }
    chunks = [
        event(
            {
                "candidates": [{"content": {"role": "model", "parts": [thought]}, "index": 0}],
                "usageMetadata": running,
                **answer,
            }
        )
    ]
    pieces: list[dict[str, Any]] = (
        [parts[1]] if behaviour.tools else [{"text": word} for word in words]
    )
    for piece in pieces:
        chunks.append(
            event(
                {
                    "candidates": [{"content": {"role": "model", "parts": [piece]}, "index": 0}],
                    "usageMetadata": running,
                    **answer,
                }
            )
        )
    if behaviour.midstream:
        return Reply(200, sse, chunks[:3], drop=True)
    chunks.append(
        event(
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": ""}]},
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": usage,
                **answer,
            }
        )
    )
    return Reply(200, sse, chunks, pause_s=0.3 if behaviour.slow else None)


# --- the server ---------------------------------------------------------------------------


_BEDROCK = re.compile(r"^/model/([^/]+)/(converse|converse-stream)$")
_GEMINI = re.compile(r"^/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)$")
_VERTEX = re.compile(
    r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/google/models/([^/:]+):"
    r"(generateContent|streamGenerateContent)$"
)


class FakeCloud:
    """The fake, served by uvicorn in a thread on 127.0.0.1 (see the module docstring)."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[Recorded] = []
        self.record = True
        # A pause between body chunks, so that streams arrive in pieces as they do from
        # a real service (the benchmark turns it off: only the gateway's CPU counts).
        self.chunk_pause_s = 0.005
        self.words = WORDS  # the answer's text deltas
        self.aborted_by_client = 0  # streams the client closed before their end
        self.tokens_issued: list[str] = []
        self.token_lifetime_s = 3600
        self.public_key_pem: bytes | None = None  # the service account's, for the JWT
        self.vertex_project = "test-project"
        self.vertex_location = "us-test1"
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app, interface="asgi3", lifespan="off", log_level="critical", access_log=False
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> FakeCloud:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake cloud did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def write_service_account(self, path: Path) -> Path:
        """A service-account key file with a fresh RSA key, its token URI on this fake
        (whose token endpoint then accepts assertions signed with that key)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        account = {
            "type": "service_account",
            "project_id": self.vertex_project,
            "private_key_id": "test-key-1",
            "private_key": pem,
            "client_email": "gateway@test-project.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "token_uri": f"{self.url}/token",
        }
        path.write_text(json.dumps(account))
        return path

    def _record(self, request: Recorded) -> None:
        if self.record:
            self.requests.append(request)

    def reset(self) -> None:
        self.requests.clear()
        self.aborted_by_client = 0

    def of_kind(self, kind: str) -> list[Recorded]:
        return [r for r in self.requests if r.kind == kind]

    # --- ASGI ---------------------------------------------------------------------------

    async def _app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        content = b""
        while True:
            message = await receive()
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        reply = self._dispatch(scope, headers, content)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode(), v.encode()) for k, v in reply.headers.items()],
            }
        )
        pause = reply.pause_s if reply.pause_s is not None else self.chunk_pause_s
        for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if pause:
                try:
                    message = await asyncio.wait_for(receive(), pause)
                except TimeoutError:
                    continue
                if message["type"] == "http.disconnect":
                    self.aborted_by_client += 1  # the gateway closed the stream
                    return
        if reply.drop:
            raise _Dropped
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _dispatch(self, scope: dict, headers: dict[str, str], content: bytes) -> Reply:
        path = scope["path"]
        raw_path = scope.get("raw_path", path.encode()).decode()
        query = scope.get("query_string", b"").decode()
        if path == "/token":
            return self._token(content)
        try:
            body = json.loads(content) if content else {}
        except ValueError:
            return _json(400, {"message": "not JSON"})
        if match := _BEDROCK.match(path):
            self._record(Recorded("bedrock", raw_path, headers, body))
            url = f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else "")
            failure = _sigv4_failure(scope["method"], url, headers, content)
            if failure is not None:
                return _json(
                    403,
                    {"message": f"The request signature we calculated does not match: {failure}"},
                    **{"x-amzn-errortype": "InvalidSignatureException"},
                )
            model = urllib.parse.unquote(match.group(1))
            stream = match.group(2) == "converse-stream"
            return _bedrock(model, stream, Behaviour.from_model(model), self.words)
        if match := _GEMINI.match(path):
            self._record(Recorded("gemini", raw_path + "?" + query, headers, body))
            if headers.get("x-goog-api-key") != GEMINI_API_KEY:
                return _json(
                    400,
                    {
                        "error": {
                            "code": 400,
                            "message": "API key not valid. Please pass a valid API key.",
                            "status": "INVALID_ARGUMENT",
                            "details": [
                                {
                                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                    "reason": "API_KEY_INVALID",
                                    "domain": "googleapis.com",
                                }
                            ],
                        }
                    },
                )
            return self._google(match.group(1), match.group(2), query)
        if match := _VERTEX.match(path):
            self._record(Recorded("vertex", raw_path + "?" + query, headers, body))
            token = headers.get("authorization", "").removeprefix("Bearer ")
            if token not in self.tokens_issued:
                return _google_error(401)
            if match.group(1, 2) != (self.vertex_project, self.vertex_location):
                return _google_error(404)
            return self._google(match.group(3), match.group(4), query)
        return _json(404, {"message": f"no route {path}"})

    def _google(self, model: str, method: str, query: str) -> Reply:
        stream = method == "streamGenerateContent"
        if stream and query != "alt=sse":
            return _google_error(400)
        return _gemini(model, stream, Behaviour.from_model(model), self.words)

    def _token(self, content: bytes) -> Reply:
        """Google's OAuth token endpoint for a service account's JWT assertion."""
        from google.auth import jwt

        form = urllib.parse.parse_qs(content.decode())
        self._record(Recorded("token", "/token", {}, {k: v[0] for k, v in form.items()}))
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return _json(400, {"error": "unsupported_grant_type"})
        try:
            # Google's own token URI is the audience, whichever URI the request went to.
            claims = jwt.decode(
                form["assertion"][0],
                certs=self.public_key_pem,
                audience="https://oauth2.googleapis.com/token",
            )
        except (ValueError, KeyError) as exc:
            return _json(400, {"error": "invalid_grant", "error_description": str(exc)})
        if "cloud-platform" not in claims.get("scope", ""):
            return _json(400, {"error": "invalid_scope"})
        token = f"ya29.fake-token-{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        return _json(
            200,
            {"access_token": token, "expires_in": self.token_lifetime_s, "token_type": "Bearer"},
        )


def main() -> None:
    """Serve the fake in the foreground (for scripts/bench.sh): the gateway then needs
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY set to the test pair, and its vertex
    instance the service-account file written to --service-account."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--service-account", type=Path, required=True)
    parser.add_argument("--chunks", type=int, default=20, help="text deltas per answer")
    args = parser.parse_args()
    fake = FakeCloud(port=args.port)
    fake.record = False  # a benchmark's millions of requests are not kept
    fake.chunk_pause_s = 0
    # As many deltas as the bench's fake upstream sends, so streams compare.
    fake.words = tuple(WORDS[i % len(WORDS)] for i in range(args.chunks))
    fake.write_service_account(args.service_account)
    with fake:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
