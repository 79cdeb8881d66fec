"""Client input that used to end in a 500 (issue 19, item 2): each is a 4xx in the error
shape of the API it came through, nothing is held, and the provider is never called."""

from __future__ import annotations

import json
import socket
import time

import pytest

from budgets.models import Hold
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

MODEL = "openai:gpt-4o-mini"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def secret(gateway):
    set_price(MODEL)
    _, secret = make_key(make_user(budget=make_budget(max_budget_usd=100)))
    return secret


def _post_raw(gateway, path: str, secret: str, content: bytes) -> object:
    with gateway.client(secret) as client:
        return client.post(path, content=content, headers={"Content-Type": "application/json"})


def _refused(gateway, response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert text in body["error"]["message"]
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()


def test_json_nested_ten_thousand_levels_deep(gateway, secret):
    body = b'{"model": "openai:gpt-4o-mini", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    response = _post_raw(gateway, "/v1/chat/completions", secret, body)
    _refused(gateway, response, 400, "not valid JSON")
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 10**30}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_completion_tokens": 2**31},
        ),
        ("/v1/messages", {"model": MODEL, "messages": HELLO, "max_tokens": 10**30}),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 10**30}),
    ],
)
def test_an_output_cap_past_any_column_is_refused(gateway, secret, path, body):
    response = gateway.post(path, secret, body)
    field = next(
        f for f in ("max_completion_tokens", "max_tokens", "max_output_tokens") if f in body
    )
    _refused(gateway, response, 400, f"{field} must be at most 2147483647")


def test_the_largest_output_cap_still_works(gateway, secret):
    response = gateway.chat(secret, model=MODEL, max_tokens=2**31 - 1)
    assert response.status_code in (200, 403), response.text  # served, or over the budget
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()


def test_a_model_name_longer_than_its_column_is_refused_and_logged(gateway, secret):
    model = "openai:" + "m" * 300
    response = gateway.chat(secret, model=model)
    _refused(gateway, response, 400, "model must be at most 255 characters")
    (row,) = UsageLog.objects.all()
    assert row.status_code == 400
    assert row.model == model[:255] or row.model == model.split(":", 1)[1][:255]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "openai:gpt-4o-mini", "messages": '
            b'[{"role": "user", "content": "a\\ud800b"}]}',
        ),
        (
            "/v1/messages",
            b'{"model": "openai:gpt-4o-mini", "max_tokens": 5, "messages": '
            b'[{"role": "user", "content": "\\udfff"}]}',
        ),
        ("/v1/responses", b'{"model": "openai:gpt-4o-mini", "input": "x\\ud83d"}'),
    ],
)
def test_a_lone_surrogate_in_the_content_is_refused(gateway, secret, path, body):
    response = _post_raw(gateway, path, secret, body)
    _refused(gateway, response, 400, "unpaired surrogates")


def test_a_paired_surrogate_escape_is_an_emoji_and_passes(gateway, secret):
    body = (
        b'{"model": "openai:gpt-4o-mini", "messages": '
        b'[{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    )
    response = _post_raw(gateway, "/v1/chat/completions", secret, body)
    assert response.status_code == 200, response.text
    assert gateway.fake.hits == 1


def test_a_management_body_over_the_size_limit_is_a_413(admin, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    response = admin.post("/v1/users", json={"user_id": "big", "alias": "x" * 5_000})
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body is too large"}


# --- the body size limit, before the body is read (common/body_limit.py) -------------------

LIMIT = 1_000
API_PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/users"]


def _raw_exchange(gateway, head: str, parts: list[bytes], timeout: float = 3.0):
    """Send a request head and body parts on a raw socket, never the rest of the body;
    returns (status, headers, body, seconds from the last byte sent to the answer)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        for part in parts:
            sock.sendall(part)
        sent = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)  # a timeout here: the server is still reading
            assert data, "the connection closed without an answer"
            reply += data
        waited = time.monotonic() - sent
        head_bytes, _, body = reply.partition(b"\r\n\r\n")
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines)
        }
        while len(body) < int(headers["content-length"]):
            data = sock.recv(65536)
            assert data
            body += data
    return int(status_line.split(" ")[1]), headers, json.loads(body), waited


def _head(gateway, path: str, secret: str, framing: str) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {gateway.url.removeprefix('http://')}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n{framing}\r\n"
    )


def _assert_too_large(path: str, status: int, headers: dict, body: dict) -> None:
    assert status == 413
    assert headers["connection"] == "close"
    assert headers["x-otari-request-id"]
    if path == "/v1/users":
        assert body == {"detail": "Request body is too large"}
    elif path == "/v1/messages":
        assert body["type"] == "error"
        assert body["error"]["type"] == "request_too_large"
        assert body["error"]["message"] == "Request body is too large"
    else:
        assert body["error"]["code"] == "request_too_large"
        assert body["error"]["message"] == "Request body is too large"


@pytest.mark.parametrize("path", API_PATHS)
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    gateway, secret, settings, path
):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT
    settings.OTARI_MASTER_KEY = "otari-mk-test-master-key"
    key = settings.OTARI_MASTER_KEY if path == "/v1/users" else secret
    # A gigabyte announced, 100 bytes sent: the answer comes without the rest.
    head = _head(gateway, path, key, f"Content-Length: {10**9}\r\n")
    status, headers, body, waited = _raw_exchange(gateway, head, [b'{"model": "' + b"x" * 89])
    _assert_too_large(path, status, headers, body)
    assert waited < 2
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()
    assert not UsageLog.objects.exists()


@pytest.mark.parametrize("path", API_PATHS)
def test_a_chunked_body_is_cut_off_at_the_limit(gateway, secret, settings, path):
    """No Content-Length: Django would read the whole body (it checks only the declared
    length), however large; the gateway answers once the limit is passed."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT
    settings.OTARI_MASTER_KEY = "otari-mk-test-master-key"
    key = settings.OTARI_MASTER_KEY if path == "/v1/users" else secret
    head = _head(gateway, path, key, "Transfer-Encoding: chunked\r\n")
    chunk = b"%x\r\n%s\r\n" % (400, b" " * 400)
    # 1,200 bytes of an endless body, and no terminating chunk.
    status, headers, body, _ = _raw_exchange(gateway, head, [chunk] * 3)
    _assert_too_large(path, status, headers, body)
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()


def test_a_chunked_body_under_the_limit_is_served(gateway, secret, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT
    payload = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 5}).encode()
    head = _head(gateway, "/v1/chat/completions", secret, "Transfer-Encoding: chunked\r\n")
    half = len(payload) // 2
    parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:half], payload[half:])]
    status, _, body, _ = _raw_exchange(gateway, head, [*parts, b"0\r\n\r\n"])
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert gateway.fake.hits == 1


# --- NUL and control characters in names (found by tests/llm_proxy/test_generation_fuzz.py) --


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # No provider prefix: looked up as a routing policy, in SQL.
        ("/v1/chat/completions", {"model": "a\u0000b", "messages": HELLO}),
        ("/v1/messages", {"model": "\u0000", "max_tokens": 5, "messages": HELLO}),
        ("/v1/responses", {"model": "openai:gpt\u0000", "input": "hi"}),
        # A named user, looked up in SQL for the master key, compared for a key.
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "user": "bob\u0000"}),
        (
            "/v1/messages",
            {"model": MODEL, "max_tokens": 5, "messages": HELLO, "metadata": {"user_id": "\0"}},
        ),
        ("/v1/responses", {"model": MODEL, "input": "hi\u0000"}),
    ],
)
def test_a_nul_anywhere_in_the_body_is_refused(gateway, secret, path, body):
    response = gateway.post(path, secret, body)
    _refused(gateway, response, 400, "may not contain NUL characters")


@pytest.mark.parametrize("model", ["openai:gpt-4o-mini\r\nX: 1", "openai:a\nb", "\tpolicy"])
def test_control_characters_in_a_model_name_are_refused(gateway, secret, model):
    response = gateway.chat(secret, model=model)
    _refused(gateway, response, 400, "model may not contain control characters")
    assert response.json()["error"]["code"] == "invalid_model"


@pytest.mark.parametrize(
    "content",
    [
        b"\xed\xa0\x80",  # a lone surrogate as bytes (CESU-8), not as a \\u escape
        b"\xff\xfe",  # no UTF-8 at all
        b"caf\xe9",  # Latin-1
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_a_body_that_is_not_utf8_is_refused(gateway, secret, path, content):
    if path == "/v1/responses":
        body = b'{"model": "openai:gpt-4o-mini", "input": "' + content + b'"}'
    else:
        body = (
            b'{"model": "openai:gpt-4o-mini", "max_tokens": 5, '
            b'"messages": [{"role": "user", "content": "' + content + b'"}]}'
        )
    response = _post_raw(gateway, path, secret, body)
    _refused(gateway, response, 400, "not valid JSON")
