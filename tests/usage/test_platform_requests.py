"""Platform mode through HTTP into the ASGI app (docs/SPEC.md §7): resolve, ordered fallback,
the money of the attempt that served, and the reports each request leaves in the outbox.

The gateway runs in this process with no broker (the embedded mode), so reports are
pushed by the same task code in a background thread; tests/usage/test_report_delivery.py
runs the delivery policy in a real Celery worker.
"""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import pytest

from budgets.models import Ceiling, GatewayUser, Hold, HoldCeiling
from budgets.services import tenancy
from llm_proxy import platform as platform_mode
from tests.factories import make_budget, make_ceiling, make_key, make_user, set_price
from tests.fake_platform import GATEWAY_TOKEN, FakePlatform, Reply, attempt
from tests.fake_provider import prompt_tokens
from tests.llm_proxy.apis import PROMPT, body_for, sse_events
from usage.models import UsageLog, UsageReport
from usage.pricing import Rates, TokenUsage, cost_usd, estimate_usd

pytestmark = pytest.mark.postgres

USER_TOKEN = "ptok-alice-user-token"
DEAR = Rates(input_per_mtok=Decimal("10"), output_per_mtok=Decimal("40"))
CHEAP = Rates(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("5"))


@pytest.fixture
def platform(gateway, settings):
    with FakePlatform(users={USER_TOKEN: "alice"}) as fake:
        settings.OTARI_PLATFORM_URL = fake.url
        settings.OTARI_PLATFORM_TOKEN = GATEWAY_TOKEN
        settings.CELERY_BROKER_URL = ""
        platform_mode.reachable_forget()
        yield fake
    platform_mode.reachable_forget()


def price(model_key: str, rates: Rates) -> None:
    set_price(model_key, str(rates.input_per_mtok), str(rates.output_per_mtok))


def wait_until(condition, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def post(gateway, api: str, body: dict, token: str = USER_TOKEN) -> httpx.Response:
    path = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}.get(api, "/v1/responses")
    return gateway.post(path, token, body)


def reports_of(response: httpx.Response) -> list[UsageReport]:
    return list(
        UsageReport.objects.filter(request_id=response.headers["X-Otari-Request-Id"]).order_by(
            "position"
        )
    )


def test_attempt_one_fails_with_500_attempt_two_serves_and_is_charged_once(gateway, platform):
    fake = gateway.fake
    price("openai:fail-500", DEAR)
    price("anthropic:claude-3-5-haiku-latest", CHEAP)
    platform.attempts = [
        attempt("att-1", "openai", "fail-500", api_base=fake.base_url, position=0),
        attempt(
            "att-2",
            "anthropic",
            "claude-3-5-haiku-latest",
            api_base=fake.root_url,
            position=1,
            api_key="sk-ant-managed-2",
        ),
    ]
    body = body_for("chat", "openai:gpt-4o-mini")

    response = post(gateway, "chat", body)

    # The client sees attempt 2's answer (an anthropic-kind provider, translated to chat).
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "claude-3-5-haiku-latest"
    # The resolve asked for the selector's provider and model, with the caller's token.
    (resolve,) = platform.resolves
    assert resolve["body"] == {"model": "gpt-4o-mini", "provider": "openai"}
    assert resolve["headers"]["x-user-token"] == USER_TOKEN
    # Each attempt went to its provider with the platform's credentials.
    sent = [
        (r.path, r.headers.get("x-api-key") or r.headers.get("authorization"))
        for r in fake.requests
    ]
    assert sent == [
        ("/v1/chat/completions", "Bearer sk-platform-managed-key"),
        ("/v1/messages", "sk-ant-managed-2"),
    ]
    # Money: one usage row, at the price of the attempt that served; the hold was the
    # dearer attempt's estimate and is released.
    usage = TokenUsage(
        input_tokens=answer["usage"]["prompt_tokens"],
        output_tokens=answer["usage"]["completion_tokens"],
    )
    assert usage.input_tokens == prompt_tokens({"messages": [{"content": PROMPT}]}, "chat")
    cost = cost_usd(usage, CHEAP)
    assert response.headers["X-Otari-Cost-Usd"] == str(cost)
    row = UsageLog.objects.get()
    assert (row.user_id, row.provider, row.model, row.status) == (
        "alice",
        "anthropic",
        "claude-3-5-haiku-latest",
        "success",
    )
    assert row.cost_usd == cost
    hold = Hold.objects.get()
    assert hold.status == Hold.Status.SETTLED
    assert hold.amount_usd == estimate_usd(
        prompt_chars=len(PROMPT), max_output_tokens=64, rates=DEAR
    )
    alice = GatewayUser.objects.get(pk="alice")
    assert (alice.spend_usd, alice.reserved_usd, alice.lifetime_spend_usd) == (cost, 0, cost)
    # Reports: attempt 1 failed (not final), attempt 2 served (final), with its usage.
    first, second = reports_of(response)
    assert (first.correlation_id, first.status, first.is_final_attempt) == (
        "att-1",
        "error",
        False,
    )
    assert first.error_class == "provider_error"
    assert (first.prompt_tokens, first.completion_tokens) == (0, 0)
    assert (second.correlation_id, second.status, second.is_final_attempt) == (
        "att-2",
        "success",
        True,
    )
    assert (second.prompt_tokens, second.completion_tokens, second.total_tokens) == (
        usage.prompt_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )
    assert second.platform_request_id == "preq-1"
    # Pushed to the platform, once each, in the protocol's shape.
    assert platform.wait_accepted(2) == {"att-1": 1, "att-2": 1}
    bodies = platform.reports()
    assert bodies["att-1"] == {
        "correlation_id": "att-1",
        "status": "error",
        "is_final_attempt": False,
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
        "error_class": "provider_error",
    }
    assert bodies["att-2"] == {
        "correlation_id": "att-2",
        "status": "success",
        "is_final_attempt": True,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
    }
    assert platform.posts[0].headers["x-gateway-token"] == GATEWAY_TOKEN
    wait_until(
        lambda: set(UsageReport.objects.values_list("delivery_status", flat=True)) == {"delivered"}
    )


def test_connection_refused_moves_to_the_next_attempt(gateway, platform):
    price("openai:gpt-4o-mini", CHEAP)
    platform.attempts = [
        attempt("dead-1", "openai", "gpt-4o-mini", api_base="http://127.0.0.1:9/v1"),
        attempt("live-2", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url, position=1),
    ]
    response = post(gateway, "messages", body_for("messages", "gpt-4o-mini"))

    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"  # the anthropic client's shape
    first, second = reports_of(response)
    assert (first.status, first.is_final_attempt, first.error_class) == (
        "error",
        False,
        "provider_unreachable",
    )
    assert (second.status, second.is_final_attempt) == ("success", True)
    row = UsageLog.objects.get()
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens), CHEAP
    )


@pytest.mark.parametrize("failing_model", ["cutstream", "fail-500"])
def test_a_stream_that_fails_before_its_first_chunk_moves_to_the_next_attempt(
    gateway, platform, failing_model
):
    price(f"openai:{failing_model}", DEAR)
    price("openai:gpt-4o-mini", CHEAP)
    platform.attempts = [
        attempt("s-1", "openai", failing_model, api_base=gateway.fake.base_url),
        attempt("s-2", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url, position=1),
    ]
    body = {**body_for("chat", "openai:gpt-4o-mini", stream=True)}

    response = post(gateway, "chat", body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == (None, "[DONE]")
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for _, data in events[:-1]
        if (chunk := __import__("json").loads(data)).get("choices")
    )
    assert text.startswith("Hello from the fake upstream")
    first, second = reports_of(response)
    assert (first.status, first.is_final_attempt) == ("error", False)
    assert (second.status, second.is_final_attempt) == ("success", True)
    row = UsageLog.objects.get()
    assert (row.model, row.status) == ("gpt-4o-mini", "success")
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens), CHEAP
    )
    alice = GatewayUser.objects.get(pk="alice")
    assert (alice.spend_usd, alice.reserved_usd) == (row.cost_usd, 0)
    assert platform.wait_accepted(2) == {"s-1": 1, "s-2": 1}


def test_when_every_attempt_fails_the_client_gets_the_last_failure(gateway, platform):
    price("openai:fail-500", DEAR)
    platform.attempts = [
        attempt("f-1", "openai", "fail-500", api_base=gateway.fake.base_url),
        attempt("f-2", "openai", "fail-429", api_base=gateway.fake.base_url, position=1),
    ]
    response = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    first, second = reports_of(response)
    assert (first.error_class, first.is_final_attempt) == ("provider_error", False)
    assert (second.error_class, second.is_final_attempt) == ("provider_rate_limited", True)
    assert second.status == "error"
    # Refunded: nothing charged, nothing held.
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    alice = GatewayUser.objects.get(pk="alice")
    assert (alice.spend_usd, alice.reserved_usd) == (0, 0)
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd, row.model) == (
        "error",
        429,
        None,
        "fail-429",
    )
    assert platform.wait_accepted(2) == {"f-1": 1, "f-2": 1}


@pytest.mark.parametrize(
    ("api", "error_type"), [("chat", "insufficient_quota"), ("messages", "billing_error")]
)
def test_resolve_402_reaches_the_client_in_the_endpoints_shape_with_no_hold(
    gateway, platform, api, error_type
):
    platform.resolve_script.append(
        Reply(status=402, body={"detail": "Wallet overdrawn: top up to continue"})
    )
    response = post(gateway, api, body_for(api, "openai:gpt-4o-mini"))

    assert response.status_code == 402
    if api == "messages":
        assert response.json() == {
            "type": "error",
            "error": {"type": "billing_error", "message": "Wallet overdrawn: top up to continue"},
            "detail": "Wallet overdrawn: top up to continue",
        }
    else:
        error = response.json()["error"]
        assert (error["type"], error["message"]) == (
            error_type,
            "Wallet overdrawn: top up to continue",
        )
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()
    assert not UsageLog.objects.exists()
    assert not UsageReport.objects.exists()


def test_resolve_errors_pass_through_or_become_502(gateway, platform, settings):
    def call(reply: Reply | None = None) -> httpx.Response:
        if reply is not None:
            platform.resolve_script.append(reply)
        return post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))

    limited = call(Reply(status=429, body={"detail": "Slow down"}, retry_after="7"))
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
    assert limited.json()["error"]["message"] == "Slow down"
    for status in (400, 403, 404):
        answer = call(Reply(status=status, body={"error": {"message": f"platform says {status}"}}))
        assert answer.status_code == status
        assert answer.json()["error"]["message"] == f"platform says {status}"
    for status in (422, 500, 503):
        answer = call(Reply(status=status, body={"detail": "internal detail"}))
        assert answer.status_code == 502
        assert "internal detail" not in answer.text
    settings.OTARI_PLATFORM_RESOLVE_TIMEOUT_SECONDS = 0.3
    slow = call(Reply(status=200, body={}, delay_s=1.5))
    assert slow.status_code == 502
    nonsense = call(Reply(status=200, body={"attempts": []}))
    assert nonsense.status_code == 502
    # An unknown token is the platform's 401, the caller's 401.
    unknown = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"), token="ptok-nobody")
    assert unknown.status_code == 401
    assert unknown.json()["error"]["type"] == "authentication_error"
    assert unknown.json()["error"]["message"] == "Invalid user token"
    assert not Hold.objects.exists()
    assert not UsageLog.objects.exists()
    assert gateway.fake.hits == 0


def test_gateway_keys_keep_working_locally_and_never_ask_the_platform(gateway, platform):
    set_price()
    user = make_user(user_id="local")
    _, secret = make_key(user)
    response = gateway.chat(secret, model="openai:gpt-4o-mini")
    assert response.status_code == 200
    assert platform.resolves == []
    assert not UsageReport.objects.exists()
    assert UsageLog.objects.get().user_id == "local"


def test_the_platform_user_is_created_on_first_sight_then_reused(gateway, platform):
    platform.attempts = [attempt("u-1", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url)]
    platform.fresh_ids = True
    assert not GatewayUser.objects.filter(pk="alice").exists()
    for _ in range(2):
        assert post(gateway, "chat", body_for("chat", "x:gpt-4o-mini")).status_code == 200
    alice = GatewayUser.objects.get(pk="alice")
    assert alice.budget is None
    assert alice.metadata == {"created_by": "platform"}
    assert UsageLog.objects.filter(user=alice).count() == 2
    assert UsageReport.objects.filter(user=alice).count() == 2


def test_an_attempt_without_a_local_price_is_served_and_logged_without_cost(gateway, platform):
    assert gateway  # require_pricing is on (the default): it does not refuse platform attempts
    platform.attempts = [attempt("n-1", "openai", "gpt-4o", api_base=gateway.fake.base_url)]
    response = post(gateway, "chat", body_for("chat", "gpt-4o"))
    assert response.status_code == 200
    assert "X-Otari-Cost-Usd" not in response.headers
    row = UsageLog.objects.get()
    assert (row.status, row.cost_usd) == ("success", None)
    assert not Hold.objects.exists()
    (report,) = reports_of(response)
    assert (report.status, report.is_final_attempt) == ("success", True)
    assert report.completion_tokens == 20


def test_local_budget_refusal_is_reported_as_the_final_attempt(gateway, platform):
    price("openai:gpt-4o-mini", CHEAP)
    make_user(user_id="alice", budget=make_budget(max_budget_usd=Decimal("0.000001")))
    platform.attempts = [
        attempt("b-1", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url),
        attempt("b-2", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url, position=1),
    ]
    response = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert gateway.fake.hits == 0
    (report,) = reports_of(response)
    assert (report.correlation_id, report.status, report.is_final_attempt) == ("b-1", "error", True)
    assert report.error_class == "budget_exceeded"
    assert UsageLog.objects.get().status_code == 403
    assert platform.wait_accepted(1) == {"b-1": 1}


def test_an_attempt_the_gateway_cannot_reach_is_skipped_and_reported(gateway, platform):
    # No api_base for an unknown provider: its key is never sent to some default server.
    platform.attempts = [
        attempt("x-1", "mystery", "m-1", api_base=None),
        attempt("x-2", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url, position=1),
    ]
    response = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))
    assert response.status_code == 200
    assert gateway.fake.hits == 1
    first, second = reports_of(response)
    assert (first.error_class, first.is_final_attempt) == ("attempt_unusable", False)
    assert (second.status, second.is_final_attempt) == ("success", True)


def test_the_request_returns_before_the_report_is_pushed(gateway, platform):
    platform.attempts = [attempt("q-1", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url)]
    platform.usage_default = Reply(status=200, delay_s=3)
    started = time.monotonic()
    response = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < 1.5
    assert UsageReport.objects.get().delivery_status == "pending"
    wait_until(lambda: UsageReport.objects.get().delivery_status == "delivered", timeout_s=15)
    assert platform.accepted() == {"q-1": 1}


def test_health_reports_platform_reachability(gateway, platform, settings):
    with gateway.client() as client:
        assert client.get("/health").json() == {"status": "healthy", "platform": "reachable"}
        settings.OTARI_PLATFORM_URL = "http://127.0.0.1:9"
        platform_mode.reachable_forget()
        assert client.get("/health").json() == {"status": "healthy", "platform": "unreachable"}
        settings.OTARI_PLATFORM_URL = ""
        assert client.get("/health").json() == {"status": "healthy"}


def test_without_a_broker_the_embedded_beat_redrives_a_lost_report(
    gateway, platform, settings, monkeypatch
):
    """A report whose task was lost (the process died right after its commit) is found
    by the re-drive, which the gateway runs itself when there is no broker."""
    from datetime import timedelta

    from django.utils import timezone

    from otari.celery import embedded_beat_reset
    from usage import ledger

    platform.attempts = [attempt("l-1", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url)]
    platform.fresh_ids = True
    with monkeypatch.context() as lost:
        lost.setattr(ledger, "enqueue_detached", lambda *args: None)
        response = post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))
    assert response.status_code == 200
    time.sleep(0.5)
    assert platform.posts == []
    (report,) = reports_of(response)
    UsageReport.objects.update(next_attempt_at=timezone.now() - timedelta(minutes=5))

    settings.OTARI_EMBEDDED_BEAT = True
    embedded_beat_reset()
    try:
        assert post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini")).status_code == 200
        wait_until(lambda: UsageReport.objects.filter(delivery_status="delivered").count() == 2)
    finally:
        settings.OTARI_EMBEDDED_BEAT = False
        embedded_beat_reset()
    assert platform.accepted() == {report.correlation_id: 1, "l-1-2": 1}


# --- ceilings narrowed to a provider follow the request to the provider that serves ---


def _narrowed_ceilings(at_openai: Decimal, at_anthropic: Decimal) -> tuple[Ceiling, Ceiling]:
    organization = tenancy.organization_ensure()
    return (
        make_ceiling(organization, make_budget(max_budget_usd=at_openai), provider="openai"),
        make_ceiling(organization, make_budget(max_budget_usd=at_anthropic), provider="anthropic"),
    )


def _fails_over_to_anthropic(gateway, platform) -> httpx.Response:
    price("openai:fail-500", DEAR)
    price("anthropic:claude-3-5-haiku-latest", CHEAP)
    platform.attempts = [
        attempt("n-1", "openai", "fail-500", api_base=gateway.fake.base_url, position=0),
        attempt(
            "n-2",
            "anthropic",
            "claude-3-5-haiku-latest",
            api_base=gateway.fake.root_url,
            position=1,
        ),
    ]
    return post(gateway, "chat", body_for("chat", "openai:gpt-4o-mini"))


def test_failover_charges_the_ceiling_narrowed_to_the_provider_that_served(gateway, platform):
    at_openai, at_anthropic = _narrowed_ceilings(Decimal("5"), Decimal("5"))

    response = _fails_over_to_anthropic(gateway, platform)

    assert response.status_code == 200, response.text
    cost = Decimal(response.headers["X-Otari-Cost-Usd"])
    at_openai.refresh_from_db()
    at_anthropic.refresh_from_db()
    assert (at_openai.spend_usd, at_openai.reserved_usd) == (0, 0)
    assert (at_anthropic.spend_usd, at_anthropic.reserved_usd) == (cost, 0)
    (link,) = HoldCeiling.objects.all()
    assert link.ceiling_id == at_anthropic.pk


def test_failover_to_a_provider_whose_ceiling_is_spent_is_refused_and_nothing_stays_held(
    gateway, platform
):
    at_openai, at_anthropic = _narrowed_ceilings(Decimal("5"), Decimal("0"))

    response = _fails_over_to_anthropic(gateway, platform)

    assert response.status_code == 403, response.text
    assert response.json()["error"]["message"].startswith("Organization budget exceeded")
    # Only the first attempt reached a provider.
    assert len(gateway.fake.requests) == 1
    for ceiling in (at_openai, at_anthropic):
        ceiling.refresh_from_db()
        assert (ceiling.spend_usd, ceiling.reserved_usd) == (0, 0)
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    assert GatewayUser.objects.get(pk="alice").reserved_usd == 0
    first, second = reports_of(response)
    assert (first.status, second.status, second.error_class) == (
        "error",
        "error",
        "budget_exceeded",
    )
