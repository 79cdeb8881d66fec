"""Who gets in, in what order, and what a refusal costs: nothing (docs/SPEC.md §1, §3.3)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.models import BudgetResetLog, GatewayUser, Hold
from budgets.services import accounts, keys
from tests.assertions import assert_books_balance, assert_untouched
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

MODEL = "openai:gpt-4o-mini"


@pytest.fixture
def priced_model():
    set_price()


def refused(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_over_budget_is_refused_without_calling_the_provider(gateway, priced_model):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("1"))
    _, secret = make_key(user)

    response = gateway.chat(secret, model=MODEL)

    refused(response, 403, "budget_exceeded")
    assert response.json()["error"]["type"] == "permission_error"
    assert gateway.fake.hits == 0
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd) == ("error", 403, None)
    assert not Hold.objects.exists()
    assert_untouched(user, spend=Decimal("1"))


def test_a_request_whose_estimate_does_not_fit_is_refused(gateway, priced_model, settings):
    # Without fitting (on by default: tests/llm_proxy/test_budget_fit.py), the estimate of
    # the default request, ceil(27/4) x 0.15 + 1024 x 0.60 per million, does not fit.
    settings.OTARI_FIT_MAX_TOKENS = False
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.000600")))
    _, secret = make_key(user)
    refused(gateway.chat(secret, model=MODEL), 403, "budget_exceeded")
    # With a small max_tokens it fits.
    assert gateway.chat(secret, model=MODEL, max_tokens=5).status_code == 200
    assert gateway.fake.hits == 1
    assert_books_balance(user)


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_free_model_works_over_budget(gateway):
    set_price("openai:gpt-4o-mini", "0", "0")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("2"))
    _, secret = make_key(user)

    response = gateway.chat(secret, model=MODEL)

    assert response.status_code == 200
    row = UsageLog.objects.get()
    assert (row.status, row.cost_usd) == ("success", Decimal(0))
    assert not Hold.objects.exists()
    assert_untouched(user, spend=Decimal("2"))


def test_unpriced_model_is_payment_required(gateway):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    _, secret = make_key(user)
    response = gateway.chat(secret, model="openai:gpt-4o-unpriced")
    refused(response, 402, "pricing_not_found")
    assert gateway.fake.hits == 0
    assert UsageLog.objects.get().status_code == 402


def test_unpriced_model_runs_uncharged_when_pricing_is_not_required(gateway, settings):
    settings.OTARI_REQUIRE_PRICING = False
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    _, secret = make_key(user)
    assert gateway.chat(secret, model="openai:gpt-4o-unpriced").status_code == 200
    row = UsageLog.objects.get()
    assert (row.status, row.cost_usd, row.completion_tokens) == ("success", None, 20)
    assert_untouched(user)


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_over_budget_wins_over_missing_price(gateway):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("1"))
    _, secret = make_key(user)
    refused(gateway.chat(secret, model="openai:gpt-4o-unpriced"), 403, "budget_exceeded")


def test_blocked_user_is_refused(gateway, priced_model):
    user = make_user(blocked=True)
    _, secret = make_key(user)
    refused(gateway.chat(secret, model=MODEL), 403, "user_blocked")
    assert gateway.fake.hits == 0
    assert UsageLog.objects.get().status_code == 403


def test_model_not_allowed(gateway, priced_model):
    _, secret = make_key(allowed_models=["openai:gpt-4o"])
    refused(gateway.chat(secret, model=MODEL), 403, "model_not_allowed")
    _, wildcard = make_key(allowed_models=["openai:*"])
    assert gateway.chat(wildcard, model=MODEL).status_code == 200
    _, none = make_key(allowed_models=[])
    refused(gateway.chat(none, model=MODEL), 403, "model_not_allowed")


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"is_active": False}, "api_key_inactive", "API key is inactive"),
        (
            {"expires_at": timezone.now() - timedelta(seconds=1)},
            "api_key_expired",
            "API key has expired",
        ),
    ],
)
def test_inactive_or_expired_key_is_unauthorized(gateway, priced_model, change, code, message):
    key, secret = make_key()
    keys.api_key_update(key_id=key.id, **change)
    response = gateway.chat(secret, model=MODEL)
    refused(response, 401, code)
    assert response.json()["error"]["message"] == message
    assert secret not in response.text
    assert not UsageLog.objects.exists()


def test_unknown_and_missing_keys_are_unauthorized(gateway, priced_model):
    refused(gateway.chat("gw-not-a-key", model=MODEL), 401, "invalid_api_key")
    refused(gateway.chat(None, model=MODEL), 401, "missing_api_key")
    refused(gateway.chat("sk-something-else", model=MODEL), 401, "invalid_api_key")
    assert not UsageLog.objects.exists()
    assert gateway.fake.hits == 0


@pytest.mark.parametrize("header", ["Otari-Key", "Otari-Key-Bearer", "x-api-key"])
def test_every_accepted_key_header(gateway, priced_model, header):
    _, secret = make_key()
    headers = {
        "Otari-Key": {"Otari-Key": secret},
        "Otari-Key-Bearer": {"Otari-Key": f"Bearer {secret}"},
        "x-api-key": {"x-api-key": secret},
    }[header]
    with gateway.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
    assert response.status_code == 200


def test_deleted_users_keys_stop_working(gateway, priced_model):
    user = make_user()
    _, secret = make_key(user)
    accounts.user_delete(user_id=user.user_id)
    refused(gateway.chat(secret, model=MODEL), 401, "api_key_inactive")


def test_key_naming_another_user_is_forbidden(gateway, priced_model):
    make_user(user_id="carol")
    _, secret = make_key(make_user(user_id="dave"))
    refused(gateway.chat(secret, model=MODEL, user="carol"), 403, "user_mismatch")
    assert gateway.chat(secret, model=MODEL, user="dave").status_code == 200


def test_user_mismatch_can_be_let_through_and_bills_the_keys_user(gateway, priced_model, settings):
    settings.OTARI_REJECT_USER_MISMATCH = False
    make_user(user_id="carol")
    _, secret = make_key(make_user(user_id="dave"))
    assert gateway.chat(secret, model=MODEL, user="carol").status_code == 200
    assert UsageLog.objects.get().user_id == "dave"


def test_master_key_bills_the_named_user(gateway, priced_model, settings):
    settings.OTARI_MASTER_KEY = "otari-mk-test-master"
    user = make_user(user_id="erin")
    refused(gateway.chat("otari-mk-test-master", model=MODEL), 400, "user_required")
    not_found = gateway.chat("otari-mk-test-master", model=MODEL, user="nobody")
    refused(not_found, 404, "user_not_found")
    assert gateway.chat("otari-mk-test-master", model=MODEL, user="erin").status_code == 200
    row = UsageLog.objects.get()
    assert (row.user_id, row.api_key_id) == (user.user_id, None)


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_excluded_key_logs_cost_but_is_never_held_or_charged(gateway, priced_model):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("1"))
    _, secret = make_key(user, exclude_from_budget=True)
    assert gateway.chat(secret, model=MODEL).status_code == 200
    row = UsageLog.objects.get()
    assert row.cost_usd > 0
    assert row.counts_toward_budget is False
    assert not Hold.objects.exists()
    assert_untouched(user, spend=Decimal("1"))


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_an_ended_period_is_rolled_at_admission(gateway, priced_model):
    budget = make_budget(max_budget_usd=Decimal("1"), budget_duration_sec=3600)
    user = make_user(budget=budget)
    _, secret = make_key(user)
    # Last period: the whole budget spent, and the period ended a minute ago.
    ended = timezone.now() - timedelta(minutes=1)
    GatewayUser.objects.filter(pk=user.pk).update(
        spend_usd=Decimal("1"),
        budget_started_at=ended - timedelta(hours=1),
        next_budget_reset_at=ended,
    )

    response = gateway.chat(secret, model=MODEL)

    assert response.status_code == 200
    log = BudgetResetLog.objects.get(reset_at=ended)
    assert log.previous_spend_usd == Decimal("1")
    assert log.next_reset_at == ended + timedelta(hours=1)
    user.refresh_from_db()
    assert user.budget_started_at == ended
    assert user.spend_usd == UsageLog.objects.get().cost_usd
    assert response.headers["X-Otari-Budget-Reset-At"] == (ended + timedelta(hours=1)).isoformat()
    assert_books_balance(user)


BAD_BODIES = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "invalid_model"),
    (b'{"model": "openai:gpt-4o-mini"}', "invalid_request"),
    (b'{"model": "openai:gpt-4o-mini", "messages": "hi"}', "invalid_request"),
    (b'{"model": "openai:gpt-4o-mini", "messages": [{"content": "hi"}]}', "invalid_request"),
    (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "invalid_model"),
    (
        b'{"model": "openai:gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],'
        b' "max_tokens": "ten"}',
        "invalid_request",
    ),
    (
        b'{"model": "openai:gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],'
        b' "stream": "yes"}',
        "invalid_request",
    ),
    (
        b'{"model": "nowhere:gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
        "unknown_provider",
    ),
    (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}', "invalid_model"),
]


@pytest.mark.parametrize(("body", "code"), BAD_BODIES)
def test_bad_input_is_a_400_in_openai_shape(gateway, priced_model, body, code):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    _, secret = make_key(user)
    with gateway.client(secret) as client:
        response = client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    refused(response, 400, code)
    assert gateway.fake.hits == 0
    assert UsageLog.objects.get().status_code == 400
    assert_untouched(user)


def test_oversized_body_is_a_413(gateway, priced_model, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    _, secret = make_key()
    response = gateway.chat(
        secret, model=MODEL, messages=[{"role": "user", "content": "x" * 20_000}]
    )
    refused(response, 413, "request_too_large")
    assert gateway.fake.hits == 0


def test_models_lists_priced_models(gateway, priced_model):
    set_price("openai:gpt-4o", "2.5", "10")
    _, secret = make_key(allowed_models=["openai:gpt-4o"])
    with gateway.client(secret) as client:
        response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["openai:gpt-4o"]
    model = body["data"][0]
    assert model["object"] == "model"
    assert model["owned_by"] == "openai"
    assert model["pricing"] == {"input_price_per_million": 2.5, "output_price_per_million": 10}
    assert gateway.fake.hits == 0


def test_routes_are_also_served_under_api_v1(gateway, priced_model):
    _, secret = make_key()
    with gateway.client(secret) as client:
        response = client.post(
            "/api/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 200
