"""What a caller sees of their budget (X-Otari-Budget-* headers, docs/SPEC.md §2), and the
temporary top-up (`manage.py topup_user`) raising the admission limit until it expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from budgets.models import GatewayUser
from tests.factories import make_budget, make_key, make_user, priced

PROMPT = "Say hello to the test suite"  # 7 prompt tokens; with max_tokens=20, 27 tokens
COST = Decimal("0.000027")  # at $1 per million tokens both ways; the estimate is the same
T0 = datetime(2025, 1, 20, 10, 0, tzinfo=UTC)

pytestmark = [pytest.mark.postgres, pytest.mark.calendar]


def ask(gateway, secret: str, model: str, **body):
    body.setdefault("max_tokens", 20)
    return gateway.chat(secret, model=model, messages=[{"role": "user", "content": PROMPT}], **body)


def topup(*args: str) -> str:
    out = StringIO()
    call_command("topup_user", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def model(gateway) -> str:
    return priced("gpt-4o-mini", "1", "1")


def test_headers_show_the_remaining_budget_and_the_next_reset(gateway, time_machine):
    time_machine.move_to(T0, tick=True)
    model = priced("gpt-4o-mini", "1", "1")  # prices are versions: set it as of T0
    user = make_user(
        budget=make_budget(max_budget_usd=Decimal("0.001"), reset_alignment="calendar_month")
    )
    _, secret = make_key(user)

    first = ask(gateway, secret, model)
    second = ask(gateway, secret, model)
    assert (first.status_code, second.status_code) == (200, 200)
    assert Decimal(first.headers["X-Otari-Budget-Remaining-Usd"]) == Decimal("0.001") - COST
    assert Decimal(second.headers["X-Otari-Budget-Remaining-Usd"]) == Decimal("0.001") - 2 * COST
    assert second.headers["X-Otari-Budget-Reset-At"] == "2025-02-01T00:00:00+00:00"

    # Across the period roll: the window moves and the remaining budget is whole again.
    time_machine.move_to(datetime(2025, 2, 1, 0, 0, 3, tzinfo=UTC), tick=True)
    rolled = ask(gateway, secret, model)
    assert rolled.status_code == 200
    assert rolled.headers["X-Otari-Budget-Reset-At"] == "2025-03-01T00:00:00+00:00"
    assert Decimal(rolled.headers["X-Otari-Budget-Remaining-Usd"]) == Decimal("0.001") - COST
    user.refresh_from_db()
    assert user.spend_usd == COST
    assert user.lifetime_spend_usd == 3 * COST


def test_streaming_headers_count_the_request_s_own_hold(gateway, model):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.001"), budget_duration_sec=3600))
    _, secret = make_key(user)
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": model,
                "stream": True,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        ) as response,
    ):
        response.read()
    # Sent before the stream is charged: what is left beside this request's hold.
    assert Decimal(response.headers["X-Otari-Budget-Remaining-Usd"]) == Decimal("0.001") - COST
    user.refresh_from_db()
    assert response.headers["X-Otari-Budget-Reset-At"] == user.next_budget_reset_at.isoformat()


def test_requests_that_take_no_hold_still_show_the_budget(gateway, model):
    free = priced("gpt-4o-mini-free", "0", "0")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.001"), budget_duration_sec=3600))
    _, secret = make_key(user)
    _, excluded = make_key(user, exclude_from_budget=True)
    assert ask(gateway, secret, model).status_code == 200

    for response in (ask(gateway, secret, free), ask(gateway, excluded, model)):
        assert response.status_code == 200
        assert Decimal(response.headers["X-Otari-Budget-Remaining-Usd"]) == (
            Decimal("0.001") - COST
        )
        assert "X-Otari-Budget-Reset-At" in response.headers


def test_no_budget_headers_without_a_limit(gateway, model):
    for budget in (None, make_budget(max_budget_usd=None, budget_duration_sec=60)):
        user = make_user(budget=budget)
        _, secret = make_key(user)
        response = ask(gateway, secret, model)
        assert response.status_code == 200
        assert "X-Otari-Budget-Remaining-Usd" not in response.headers
        assert "X-Otari-Budget-Reset-At" not in response.headers


def test_a_top_up_raises_the_limit_until_it_expires(gateway, time_machine):
    time_machine.move_to(T0, tick=True)
    model = priced("gpt-4o-mini", "1", "1")
    user = make_user(budget=make_budget(max_budget_usd=2 * COST), user_id="erin")
    _, secret = make_key(user)
    assert [ask(gateway, secret, model).status_code for _ in range(3)] == [200, 200, 403]

    until = T0 + timedelta(hours=1)
    out = topup("erin", "0.000054", "--until", until.isoformat())
    assert out == f"topup_user: erin limit +$0.000054 until {until.isoformat()}\n"
    raised = ask(gateway, secret, model)
    assert raised.status_code == 200
    assert Decimal(raised.headers["X-Otari-Budget-Remaining-Usd"]) == COST
    time_machine.move_to(until - timedelta(seconds=2), tick=True)
    assert ask(gateway, secret, model).status_code == 200
    refused = ask(gateway, secret, model)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "budget_exceeded"

    # Expired: the budget's own max again, which 4 requests' spend is above.
    time_machine.move_to(until + timedelta(seconds=1), tick=True)
    user.refresh_from_db()
    assert user.spend_usd == 4 * COST
    assert ask(gateway, secret, model).status_code == 403
    # A new top-up works again, and --clear removes it.
    topup("erin", "1", "--until", (until + timedelta(days=1)).isoformat())
    assert ask(gateway, secret, model).status_code == 200
    assert topup("erin", "--clear") == "topup_user: erin has no top-up\n"
    user.refresh_from_db()
    assert (user.topup_usd, user.topup_expires_at) == (0, None)
    assert ask(gateway, secret, model).status_code == 403


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "5", "--until", "2999-01-01T00:00:00Z"], "no user with id 'nobody'"),
        (["frank", "5"], "give AMOUNT and --until"),
        (["frank", "5", "--until", "2001-01-01T00:00:00Z"], "--until must be in the future"),
        (["frank", "0", "--until", "2999-01-01"], "AMOUNT must be positive"),
        (["frank", "5", "--clear"], "--clear takes no AMOUNT"),
    ],
)
def test_topup_user_refuses_bad_input(db, args, message):
    make_user(user_id="frank")
    with pytest.raises(CommandError, match=message):
        topup(*args)
    assert GatewayUser.objects.get(pk="frank").topup_usd == 0


@pytest.mark.parametrize("amount", ["-1", "abc", "1e13", "0.0000001", "NaN"])
def test_topup_user_refuses_bad_amounts(db, amount):
    make_user(user_id="frank")
    with pytest.raises(CommandError):
        topup("frank", amount, "--until", "2999-01-01")
