"""Chat completions through HTTP into the ASGI app: the money of every exit path (§3.4)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from budgets.models import GatewayUser, Hold
from tests.factories import make_budget, make_key, make_user, priced, set_price
from tests.fake_provider import prompt_tokens
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT = "Say hello to the test suite"


def expected_cost(prompt: int, completion: int, rates: Rates = RATES) -> Decimal:
    return cost_usd(TokenUsage(input_tokens=prompt, output_tokens=completion), rates)


def assert_books_balance(user: GatewayUser) -> None:
    """reserved = open holds; spend = counted usage cost in the window."""
    user.refresh_from_db()
    open_holds = sum(
        (h.amount_usd for h in Hold.objects.filter(user=user, status=Hold.Status.OPEN)),
        Decimal(0),
    )
    assert user.reserved_usd == open_holds
    spent = sum(
        (
            row.cost_usd or Decimal(0)
            for row in UsageLog.objects.filter(user=user, counts_toward_budget=True)
        ),
        Decimal(0),
    )
    assert user.spend_usd == spent


@pytest.fixture
def alice():
    set_price()
    budget = make_budget(max_budget_usd=Decimal("10"))
    user = make_user(budget=budget, user_id="alice")
    key, secret = make_key(user)
    return user, key, secret


def test_non_streaming_success_charges_the_reported_usage(gateway, alice):
    user, key, secret = alice
    response = gateway.chat(secret, model="openai:gpt-4o-mini")

    assert response.status_code == 200
    body = response.json()
    p, c = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    assert (p, c) == (prompt_tokens({"messages": [{"content": PROMPT}]}, "chat"), 20)
    cost = expected_cost(p, c)
    assert response.headers["X-Otari-Cost-Usd"] == str(cost)
    user.refresh_from_db()
    assert user.spend_usd == cost
    assert user.lifetime_spend_usd == cost
    assert user.reserved_usd == 0
    row = UsageLog.objects.get()
    assert str(row.id) == response.headers["X-Otari-Request-Id"]
    assert (row.status, row.status_code, row.prompt_tokens, row.completion_tokens) == (
        "success",
        200,
        p,
        c,
    )
    assert row.cost_usd == cost
    assert row.api_key_id == key.id
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert Decimal(response.headers["X-Otari-Budget-Remaining-Usd"]) == Decimal("10") - cost
    assert_books_balance(user)


def test_streaming_success_charges_the_usage_chunk(gateway, alice):
    user, _, secret = alice
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": priced("gpt-4o-mini-chunks-7"),
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]

    assert lines[-1] == "data: [DONE]"
    # The client asked for no stream_options: the gateway asked the provider for usage.
    assert gateway.fake.last_request.body["stream_options"] == {"include_usage": True}
    cost = expected_cost(math.ceil(len(PROMPT) / 4), 7)
    user.refresh_from_db()
    assert user.spend_usd == cost
    assert user.reserved_usd == 0
    row = UsageLog.objects.get()
    assert (row.status, row.completion_tokens, row.cost_usd) == ("success", 7, cost)
    assert_books_balance(user)


def test_identical_requests_cost_the_same_streamed_or_not(gateway, alice):
    _, _, secret = alice
    gateway.chat(secret, model=priced("gpt-4o-mini-chunks-9"))
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "openai:gpt-4o-mini-chunks-9",
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        ) as response,
    ):
        response.read()
    costs = {row.cost_usd for row in UsageLog.objects.all()}
    assert len(costs) == 1
    assert UsageLog.objects.count() == 2
