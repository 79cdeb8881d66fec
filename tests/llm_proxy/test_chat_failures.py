"""Chat completions that fail: before the response is committed (refund), mid-stream
(charge what was delivered), and when the client goes away (docs/SPEC.md §3.4, §4)."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from decimal import Decimal

import httpx
import pytest

from budgets.models import Hold
from tests.assertions import assert_books_balance, assert_untouched
from tests.factories import make_budget, make_key, make_user, priced, set_price
from tests.fake_provider import SECRET_IN_ERRORS, URL_IN_ERRORS, WORDS
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT = "Say hello to the test suite"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def bob():
    budget = make_budget(max_budget_usd=Decimal("5"))
    user = make_user(budget=budget, user_id="bob")
    _, secret = make_key(user)
    return user, secret


def stream(gateway, secret, model, **body):
    """POST a streaming chat request; returns (status, headers, text)."""
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "stream": True, "messages": MESSAGES, **body},
        ) as response,
    ):
        return response.status_code, response.headers, response.read().decode()


def the_row() -> UsageLog:
    return UsageLog.objects.get()


# --- before the response is committed: a plain HTTP error and a full refund ---------------

PRE_COMMIT = [
    # (selector, status, error code)
    ("openai:gpt-4o-mini-fail-500", 502, "provider_error"),
    ("openai:gpt-4o-mini-fail-503", 502, "provider_error"),
    ("openai:gpt-4o-mini-fail-429", 429, "provider_rate_limited"),
    ("openai:gpt-4o-mini-fail-401", 502, "provider_auth_error"),
    ("openai:gpt-4o-mini-fail-404", 404, "provider_not_found"),
    ("openai:gpt-4o-mini-fail-400", 400, "provider_invalid_request"),
    ("short:gpt-4o-mini-hang", 504, "provider_timeout"),
    ("dead:gpt-4o-mini", 502, "provider_unreachable"),
]


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(("selector", "status", "code"), PRE_COMMIT)
def test_failure_before_commit_is_an_http_error_with_full_refund(
    gateway, bob, selector, status, code, streaming
):
    user, secret = bob
    provider, model = selector.split(":", 1)
    set_price(selector)
    response = gateway.chat(secret, model=selector, stream=streaming)

    assert response.status_code == status
    assert not response.headers["content-type"].startswith("text/event-stream")
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert_untouched(user)
    row = the_row()
    assert (row.status, row.status_code, row.cost_usd) == ("error", status, None)
    assert (row.provider, row.model) == (provider, model)
    assert str(row.id) == response.headers["X-Otari-Request-Id"]
    assert Hold.objects.get().status == Hold.Status.REFUNDED


def test_rate_limit_keeps_retry_after(gateway, bob):
    _, secret = bob
    response = gateway.chat(secret, model=priced("gpt-4o-mini-fail-429"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"


def test_provider_messages_are_redacted_and_keys_never_leak(gateway, bob, caplog):
    _, secret = bob
    caplog.set_level(logging.DEBUG)
    response = gateway.chat(secret, model=priced("gpt-4o-mini-fail-400"))

    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert SECRET_IN_ERRORS not in message
    assert URL_IN_ERRORS not in message
    assert len(message) <= 400
    assert "sk-test-provider-key" not in response.text
    assert "sk-test-provider-key" not in caplog.text
    assert SECRET_IN_ERRORS not in the_row().error_message
    # The fake saw the gateway's provider credential, so it was really in play.
    assert gateway.fake.last_request.headers["authorization"] == "Bearer sk-test-provider-key"


def test_client_that_gives_up_while_the_stream_opens_leaves_no_hold(gateway, bob):
    user, secret = bob
    with pytest.raises(httpx.ReadTimeout), gateway.client(secret, timeout=0.5) as client:
        client.post(
            "/v1/chat/completions",
            json={"model": priced("gpt-4o-mini-hang"), "stream": True, "messages": MESSAGES},
        )
    # The gateway notices the disconnect, cancels the upstream call and refunds.
    assert gateway.fake.wait_for(lambda: UsageLog.objects.exists(), timeout=5)
    assert_untouched(user)
    row = the_row()
    assert (row.status, row.status_code) == ("client_disconnected", 499)


# --- after the stream started: charge what was delivered ----------------------------------


def test_mid_stream_failure_charges_what_was_delivered(gateway, bob):
    user, secret = bob
    status, _, text = stream(gateway, secret, priced("gpt-4o-mini-dropafter-5"))

    assert status == 200
    events = [line for line in text.split("\n\n") if line]
    assert json.loads(events[-2].removeprefix("data: ")) == {
        "error": {"message": "An error occurred during streaming", "type": "server_error"}
    }
    assert events[-1] == "data: [DONE]"
    delivered = "".join(WORDS[:5])
    usage = TokenUsage(
        input_tokens=math.ceil(len(PROMPT) / 4), output_tokens=math.ceil(len(delivered) / 4)
    )
    row = the_row()
    assert (row.status, row.status_code) == ("error", 502)
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.output_tokens)
    assert row.cost_usd == cost_usd(usage, RATES)
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert_untouched(user, spend=row.cost_usd)
    assert_books_balance(user)


def test_non_streaming_body_cut_short_is_refunded(gateway, bob):
    user, secret = bob
    response = gateway.chat(secret, model=priced("gpt-4o-mini-fail-midstream"))
    assert response.status_code == 502
    assert_untouched(user)


def test_client_disconnect_mid_stream_charges_delivered_and_closes_upstream(gateway, bob):
    user, secret = bob
    model = priced("gpt-4o-mini-chunks-40-delay-50")
    received = ""
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "stream": True, "messages": MESSAGES},
        ) as response,
    ):
        for line in response.iter_lines():
            if '"content":"' in line:
                received += line
                if received.count('"content":"') >= 5:
                    break
    # The client hung up after 5 content chunks of 40.
    assert gateway.fake.wait_for(lambda: gateway.fake.aborted_by_client == 1, timeout=5)
    assert gateway.fake.wait_for(
        lambda: UsageLog.objects.filter(status="client_disconnected").exists(), timeout=5
    )
    row = the_row()
    assert row.status_code == 499
    # Charged for what was sent before the disconnect was noticed: at least what the
    # client read, far less than the whole answer.
    assert 2 <= row.completion_tokens < 20
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens), RATES
    )
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert_untouched(user, spend=row.cost_usd)


def test_stream_without_usage_is_charged_its_estimate(gateway, bob):
    user, secret = bob
    status, _, text = stream(gateway, secret, priced("gpt-4o-mini-nousage-chunks-3"), max_tokens=50)
    assert status == 200
    assert text.endswith("data: [DONE]\n\n")
    estimate = cost_usd(
        TokenUsage(input_tokens=math.ceil(len(PROMPT) / 4), output_tokens=50), RATES
    )
    row = the_row()
    assert (row.status, row.cost_usd) == ("success", estimate)
    assert_untouched(user, spend=estimate)


def test_stream_without_usage_free_policy(gateway, bob, settings):
    settings.OTARI_STREAM_MISSING_USAGE = "free"
    user, secret = bob
    stream(gateway, secret, priced("gpt-4o-mini-nousage-chunks-3"))
    assert the_row().cost_usd == 0
    assert_untouched(user)


def test_keepalive_comments_while_the_provider_is_silent(gateway, bob, settings):
    settings.OTARI_STREAM_KEEPALIVE_SECONDS = 0.2
    _, secret = bob
    status, _, text = stream(gateway, secret, priced("gpt-4o-mini-chunks-3-delay-700"))
    assert status == 200
    assert ": keepalive\n\n" in text
    assert text.endswith("data: [DONE]\n\n")


def test_upstream_connection_is_pooled(gateway, bob):
    """One shared client per process: sequential requests reuse the upstream connection."""
    _, secret = bob
    set_price()
    for _ in range(5):
        assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    assert gateway.fake.open_connections <= 2


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sequential_failures_leave_no_hold_behind(gateway, bob):
    user, secret = bob
    model = priced("gpt-4o-mini-fail-500")
    started = time.monotonic()
    for _ in range(20):
        assert stream(gateway, secret, model)[0] == 502
    assert time.monotonic() - started < 20
    assert_untouched(user)
    assert UsageLog.objects.filter(status="error").count() == 20
    set_price()
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200


# --- the provider's own words, for the operator -------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize(
    ("selector", "upstream_status", "upstream_error"),
    [
        ("openai:gpt-4o-mini-fail-500", 500, "fake upstream: injected 500 Internal Server Error"),
        ("openai:gpt-4o-mini-fail-503", 503, "fake upstream: injected 503 Service Unavailable"),
        ("openai:gpt-4o-mini-fail-401", 401, "fake upstream: injected 401 Unauthorized"),
        ("dead:gpt-4o-mini", None, "ConnectError: All connection attempts failed"),
    ],
)
def test_the_upstream_cause_is_recorded_and_logged_but_not_sent(
    gateway, bob, caplog, selector, upstream_status, upstream_error, streaming
):
    _, secret = bob
    set_price(selector)
    caplog.set_level(logging.INFO)
    response = gateway.chat(secret, model=selector, stream=streaming)

    assert response.status_code == 502
    assert upstream_error not in response.text
    row = the_row()
    assert (row.upstream_status_code, row.upstream_error) == (upstream_status, upstream_error)
    assert row.error_message == response.json()["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if str(row.id) in r.getMessage()]
    assert any(upstream_error in line for line in logged), logged


def test_the_recorded_upstream_message_is_redacted(gateway, bob):
    _, secret = bob
    gateway.chat(secret, model=priced("gpt-4o-mini-fail-400"))
    row = the_row()
    assert row.upstream_status_code == 400
    assert row.upstream_error.startswith("fake upstream: invalid request (provider key")
    assert SECRET_IN_ERRORS not in row.upstream_error
    assert URL_IN_ERRORS not in row.upstream_error


def test_a_stream_that_opens_with_an_error_records_what_it_said(gateway, bob):
    _, secret = bob
    response = gateway.chat(secret, model=priced("gpt-4o-mini-errorfirst"), stream=True)
    assert response.status_code == 502
    row = the_row()
    assert row.upstream_status_code == 200
    assert row.upstream_error
    assert row.upstream_error not in response.text
