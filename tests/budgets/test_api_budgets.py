"""Budgets over HTTP, through the ASGI app (docs/SPEC.md §6, §3.2, §3.6)."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from budgets.models import Budget, BudgetResetLog, GatewayUser
from tests.admin.conftest import charge, open_hold
from tests.conftest import start_server_process
from tests.factories import make_budget, make_key, make_user, set_price


def test_create_get_list_update_delete(admin):
    created = admin.post(
        "/v1/budgets",
        json={"name": "team", "max_budget": 12.345678, "budget_duration_sec": 3600},
    )
    assert created.status_code == 200
    body = created.json()
    budget_id = body["budget_id"]
    assert isinstance(budget_id, str)
    assert body["max_budget"] == 12.345678
    assert (body["budget_duration_sec"], body["reset_alignment"]) == (3600, None)
    assert (body["user_count"], body["total_spend"], body["total_reserved"]) == (0, 0, 0)
    assert body["created_at"].endswith("+00:00")
    assert Budget.objects.get(pk=budget_id).max_budget_usd == Decimal("12.345678")

    assert admin.get(f"/v1/budgets/{budget_id}").json() == body
    assert [b["budget_id"] for b in admin.get("/api/v1/budgets").json()] == [budget_id]

    updated = admin.patch(f"/v1/budgets/{budget_id}", json={"reset_alignment": "calendar_month"})
    assert updated.status_code == 200
    # One kind of period replaces the other.
    assert (updated.json()["reset_alignment"], updated.json()["budget_duration_sec"]) == (
        "calendar_month",
        None,
    )
    assert updated.json()["max_budget"] == 12.345678
    assert (
        admin.patch(f"/v1/budgets/{budget_id}", json={"max_budget": None}).json()["max_budget"]
        is None
    )

    assert admin.delete(f"/v1/budgets/{budget_id}").status_code == 204
    missing = admin.get(f"/v1/budgets/{budget_id}")
    assert missing.status_code == 404
    assert budget_id in missing.json()["detail"]


@pytest.mark.postgres
def test_money_is_exact_both_ways(admin):
    """Parsed from the JSON text as Decimal, written back as a JSON number, every digit.

    PostgreSQL only: SQLite stores decimals as binary floats, ~15 significant digits
    (docs/ARCHITECTURE.md, "Money")."""
    response = admin.post(
        "/v1/budgets",
        content=b'{"max_budget": 123456789012.1234567891}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert b'"max_budget":123456789012.1234567891' in response.content
    assert Budget.objects.get().max_budget_usd == Decimal("123456789012.1234567891")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_budget": -1}, "max_budget"),
        ({"max_budget": 1_000_000_000_000}, "max_budget"),
        ({"max_budget": "10"}, "max_budget"),
        ({"max_budget": 0.12345678901}, "max_budget"),
        ({"budget_duration_sec": 0}, "budget_duration_sec"),
        ({"budget_duration_sec": "60"}, "budget_duration_sec"),
        ({"reset_alignment": "fortnight"}, "reset_alignment"),
        ({"name": 5}, "name"),
        ({"token_limit": 1000}, "token_limit"),
    ],
)
def test_validation_is_422_naming_the_field_not_the_value(admin, body, field):
    response = admin.post("/v1/budgets", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(field + ":")
    assert "fortnight" not in detail
    assert not Budget.objects.exists()


def test_duration_and_alignment_together_is_400(admin):
    response = admin.post(
        "/v1/budgets", json={"budget_duration_sec": 60, "reset_alignment": "calendar_day"}
    )
    assert response.status_code == 400
    assert "mutually exclusive" in response.json()["detail"]
    budget = make_budget(budget_duration_sec=60)
    response = admin.patch(
        f"/v1/budgets/{budget.pk}",
        json={"budget_duration_sec": 30, "reset_alignment": "calendar_day"},
    )
    assert response.status_code == 400
    budget.refresh_from_db()
    assert (budget.budget_duration_sec, budget.reset_alignment) == (60, None)


def test_malformed_json_and_nan_are_400(admin):
    for content in (b"{not json", b'{"max_budget": NaN}', b'{"max_budget": Infinity}'):
        response = admin.post(
            "/v1/budgets", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, content
        assert response.json() == {"detail": "Malformed JSON body"}
    assert not Budget.objects.exists()


def test_pagination(admin):
    ids = [make_budget(name=f"b{i}").pk for i in range(5)]
    assert [b["budget_id"] for b in admin.get("/v1/budgets?limit=2").json()] == ids[:2]
    assert [b["budget_id"] for b in admin.get("/v1/budgets?skip=2&limit=2").json()] == ids[2:4]
    assert admin.get("/v1/budgets?skip=5").json() == []
    for query in ("limit=0", "limit=1001", "skip=-1", "limit=abc"):
        response = admin.get(f"/v1/budgets?{query}")
        assert response.status_code == 422, query
        assert set(response.json()) == {"detail"}


def test_totals_count_live_users_only(admin):
    budget = make_budget(max_budget_usd=Decimal("5"))
    a = make_user(budget=budget, user_id="a")
    b = make_user(budget=budget, user_id="b")
    charge(a, "1.25")
    charge(b, "0.000001")
    open_hold(b, "2")
    body = admin.get(f"/v1/budgets/{budget.pk}").json()
    assert (body["user_count"], body["total_spend"], body["total_reserved"]) == (2, 1.250001, 2)
    assert admin.delete("/v1/users/b").status_code == 204
    body = admin.get(f"/v1/budgets/{budget.pk}").json()
    assert (body["user_count"], body["total_spend"]) == (1, 1.25)


def test_delete_refused_while_live_users_remain(admin):
    budget = make_budget()
    make_user(budget=budget, user_id="a")
    response = admin.delete(f"/v1/budgets/{budget.pk}")
    assert response.status_code == 409
    assert Budget.objects.filter(pk=budget.pk).exists()
    # A deleted user does not pin the budget forever.
    assert admin.delete("/v1/users/a").status_code == 204
    assert admin.delete(f"/v1/budgets/{budget.pk}").status_code == 204
    assert GatewayUser.objects.get(pk="a").budget_id is None


def test_reset_logs_list_and_outlive_the_budget(admin):
    first = make_budget(budget_duration_sec=60)
    second = make_budget()
    make_user(budget=first, user_id="a")
    GatewayUser.objects.filter(pk="a").update(spend_usd=Decimal("0.5"))
    # Re-assigning starts a fresh window and logs the old one's spend (§3.6).
    response = admin.patch("/v1/users/a", json={"budget_id": second.pk})
    assert response.status_code == 200
    assert response.json()["spend"] == 0
    logs = admin.get(f"/v1/budgets/{second.pk}/reset-logs").json()
    assert len(logs) == 1
    assert logs[0]["previous_spend"] == 0.5
    assert isinstance(logs[0]["id"], int)
    assert (logs[0]["user_id"], logs[0]["budget_id"]) == ("a", second.pk)
    assert admin.get(f"/v1/budgets/{first.pk}/reset-logs").json() == []
    assert admin.patch("/v1/users/a", json={"budget_id": None}).status_code == 200
    assert admin.delete(f"/v1/budgets/{second.pk}").status_code == 204
    assert len(admin.get(f"/v1/budgets/{second.pk}/reset-logs").json()) == 1
    assert admin.get("/v1/budgets/nope/reset-logs").status_code == 404
    assert BudgetResetLog.objects.count() == 2


def test_budget_edit_applies_to_the_next_request(gateway, admin):
    set_price()
    budget = make_budget(max_budget_usd=Decimal("10"))
    _, secret = make_key(make_user(budget=budget, user_id="a"))
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    assert admin.patch(f"/v1/budgets/{budget.pk}", json={"max_budget": 0}).status_code == 200
    refused = gateway.chat(secret, model="openai:gpt-4o-mini")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "budget_exceeded"


@pytest.mark.postgres
@pytest.mark.slow
def test_budget_edit_applies_in_another_process(gateway, admin, gateway_config_file):
    """No cache anywhere: a budget lowered through one process binds the next request
    served by another."""
    set_price()
    budget = make_budget(max_budget_usd=Decimal("10"))
    _, secret = make_key(make_user(budget=budget, user_id="a"))
    other = start_server_process(gateway_config_file)
    body = {"model": "openai:gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        served = httpx.post(other.url + "/v1/chat/completions", json=body, headers=headers)
        assert served.status_code == 200
        assert admin.patch(f"/v1/budgets/{budget.pk}", json={"max_budget": 0}).status_code == 200
        refused = httpx.post(other.url + "/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "budget_exceeded"
    finally:
        other.kill()
