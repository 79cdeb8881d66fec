"""A request fitted to the budget that is left, and refusals that explain themselves
(docs/ARCHITECTURE.md, "Fitting a request to the budget")."""

from __future__ import annotations

from decimal import Decimal

import pytest

from budgets.models import GatewayUser, Hold
from tests.assertions import assert_untouched
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog
from usage.pricing import Rates, estimate_usd, output_tokens_within

# These tests stage a nearly full budget by writing spend directly (no usage rows behind it),
# so the books cannot balance afterwards.
pytestmark = pytest.mark.books_unbalanced

MODEL = "openai:gpt-4o-mini"
RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT = "Say hello to the test suite"  # 27 characters: 7 tokens in the estimate
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def tight():
    """The user of the report: $0.001 budget, 39.6% spent, nothing held."""
    set_price()
    set_price("anthropic:claude-test", "0.15", "0.60")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.001")), user_id="tight")
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("0.000396"))
    _, secret = make_key(user)
    return user, secret


def _fits(left: str) -> int:
    tokens = output_tokens_within(Decimal(left), prompt_chars=len(PROMPT), rates=RATES)
    assert tokens is not None
    return tokens


REQUESTS = [
    # (endpoint, body, the upstream field that carries the maximum)
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, "max_completion_tokens"),
    ("/v1/responses", {"model": MODEL, "input": PROMPT}, "max_output_tokens"),
    # Chat translated for an anthropic-kind provider: its required max_tokens.
    (
        "/v1/chat/completions",
        {"model": "anthropic:claude-test", "messages": MESSAGES},
        "max_tokens",
    ),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("path", "body", "field"), REQUESTS, ids=["chat", "responses", "xlate"])
def test_a_request_without_a_maximum_is_fitted_to_what_is_left(
    gateway, tight, path, body, field, streaming
):
    user, secret = tight
    expected = _fits("0.000604")  # $0.001 - $0.000396
    assert 16 <= expected < 1024

    with gateway.client(secret) as client:
        response = client.post(path, json={**body, "stream": streaming})
        assert response.status_code == 200, response.text
        response.read()

    assert response.headers["X-Otari-Max-Tokens"] == str(expected)
    assert gateway.fake.last_request.body[field] == expected
    hold = Hold.objects.get(user=user)
    assert hold.amount_usd == estimate_usd(
        prompt_chars=len(PROMPT), max_output_tokens=expected, rates=RATES
    )
    assert hold.status == Hold.Status.SETTLED
    row = UsageLog.objects.get()
    assert row.status == "success"
    assert_untouched(user, spend=Decimal("0.000396") + row.cost_usd)


def test_a_request_that_fits_with_the_default_is_sent_unchanged(gateway, tight):
    user, secret = tight
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("0"))
    response = gateway.chat(secret, model=MODEL)
    assert response.status_code == 200
    assert "X-Otari-Max-Tokens" not in response.headers
    sent = gateway.fake.last_request.body
    assert "max_completion_tokens" not in sent
    assert "max_tokens" not in sent


def test_a_maximum_the_client_set_is_kept_and_refused_with_the_fix(gateway, tight):
    user, secret = tight
    response = gateway.chat(secret, model=MODEL, max_tokens=2000)

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded"
    needed = estimate_usd(prompt_chars=len(PROMPT), max_output_tokens=2000, rates=RATES)
    assert error["message"] == (
        f"Budget exceeded: $0.000604 left of $0.001; this request needs up to ${needed} "
        f"(2000 output tokens at most). Set max_completion_tokens or max_tokens to "
        f"{_fits('0.000604')} or less."
    )
    assert response.headers["X-Otari-Budget-Remaining-Usd"] == "0.000604"
    assert gateway.fake.hits == 0
    row = UsageLog.objects.get()
    assert (row.status_code, row.error_message) == (403, error["message"])
    assert_untouched(user, spend=Decimal("0.000396"))


def test_the_anthropic_api_gets_the_explanation_in_its_own_shape(gateway, tight):
    _user, secret = tight
    with gateway.client(secret) as client:
        response = client.post(
            "/v1/messages",
            json={"model": "anthropic:claude-test", "max_tokens": 4096, "messages": MESSAGES},
        )
    assert response.status_code == 403
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["message"].startswith("Budget exceeded: $0.000604 left of $0.001;")
    assert body["error"]["message"].endswith(f"Set max_tokens to {_fits('0.000604')} or less.")
    assert response.headers["X-Otari-Budget-Remaining-Usd"] == "0.000604"


def test_below_the_floor_the_request_is_refused_not_shrunk(gateway, tight, settings):
    user, secret = tight
    # 10 output tokens fit: fewer than the floor of 16.
    left = estimate_usd(prompt_chars=len(PROMPT), max_output_tokens=10, rates=RATES)
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("0.001") - left)
    response = gateway.chat(secret, model=MODEL)
    assert response.status_code == 403
    assert (
        f"Set max_completion_tokens or max_tokens to {_fits(str(left))} or less"
        in (response.json()["error"]["message"])
    )
    assert gateway.fake.hits == 0
    # A lower floor lets it through, shrunk.
    settings.OTARI_FIT_MIN_OUTPUT_TOKENS = 5
    response = gateway.chat(secret, model=MODEL)
    assert response.status_code == 200
    assert response.headers["X-Otari-Max-Tokens"] == str(_fits(str(left)))


def test_fitting_can_be_turned_off(gateway, tight, settings):
    settings.OTARI_FIT_MAX_TOKENS = False
    _, secret = tight
    response = gateway.chat(secret, model=MODEL)
    assert response.status_code == 403
    assert "(1024 output tokens at most)" in response.json()["error"]["message"]


def test_an_exhausted_budget_says_when_it_resets(gateway):
    set_price()
    user = make_user(
        budget=make_budget(max_budget_usd=Decimal("1"), reset_alignment="calendar_month")
    )
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("1"))
    user.refresh_from_db()
    _, secret = make_key(user)
    response = gateway.chat(secret, model=MODEL)
    assert response.status_code == 403
    assert response.json()["error"]["message"] == (
        f"Budget exceeded: $0 left of $1. "
        f"The budget resets at {user.next_budget_reset_at.isoformat()}."
    )
    assert response.headers["X-Otari-Budget-Remaining-Usd"] == "0"
    assert response.headers["X-Otari-Budget-Reset-At"] == user.next_budget_reset_at.isoformat()
