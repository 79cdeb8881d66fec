"""The usage log answers questions: why a request failed, totals over the whole filter,
date ranges in UTC, filters by provider, status code, key and budget, and suggestions
for the user, model and key filters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.urls import reverse

from budgets.services import holds
from tests.admin.conftest import admin_url, charge, fail
from tests.factories import make_budget, make_key, make_user, set_price
from usage import ledger
from usage.admin import UsageLogAdmin
from usage.models import UsageLog

pytestmark = pytest.mark.django_db

DAY1 = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
DAY3 = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)


def _list(client, **params):
    response = client.get(admin_url(UsageLog, "changelist"), params)
    assert response.status_code == 200, response
    return response


def _rows(response) -> list[str]:
    return sorted(str(row.pk) for row in response.context["cl"].result_list)


@pytest.fixture
def history():
    research = make_budget(name="Research", max_budget_usd=Decimal("100"))
    # Users from before the history (a usage row is never dated before its user's window).
    since = datetime(2026, 2, 1, tzinfo=UTC)
    ana = make_user(budget=research, user_id="ana", alias="Ana Lima", now=since)
    ben = make_user(user_id="ben", alias="Ben Okafor", now=since)
    rows = {
        "a1": charge(ana, "0.25", at=DAY1),
        "a2": charge(ana, "1.5", at=DAY2, provider="anthropic", model="claude-sonnet-4"),
        "b1": charge(ben, "0.000042", at=DAY3),
        "b2": fail(ben, at=DAY3, status_code=429, message="Rate limit: 60 requests per minute"),
    }
    return research, ana, ben, rows


def test_the_failure_reason_is_in_the_list(admin_client, history):
    page = _list(admin_client).content.decode()
    assert "Rate limit: 60 requests per minute" in page
    assert "error · 429" in page


def _totals(client, **params) -> dict:
    response = client.get(reverse("admin:usage_usagelog_totals"), params)
    assert response.status_code == 200
    return response.json()


def test_totals_cover_the_whole_filter_not_the_page(admin_client, history, monkeypatch):
    monkeypatch.setattr(UsageLogAdmin, "list_per_page", 1)
    page = _list(admin_client)
    assert len(page.context["cl"].result_list) == 1
    # The page names where its totals come from, with its own filter.
    assert 'data-totals-url="/admin/usage/usagelog/totals.json?"' in page.content.decode()
    assert _totals(admin_client) == {
        "complete": True,
        "requests": 4,
        "failed": 1,
        "prompt_tokens": 300,
        "completion_tokens": 60,
        "cost_usd": "1.7500420000",
        "cost": "$1.75",
        "cost_exact": "$1.750042",
    }
    ana_only = _totals(admin_client, user="ana")
    assert (ana_only["requests"], ana_only["cost_exact"]) == (2, "$1.75")
    up_to_day1 = _totals(admin_client, date_to="2026-03-01")
    assert (up_to_day1["requests"], up_to_day1["cost"]) == (1, "$0.25")


@pytest.mark.postgres  # statement_timeout and pg_sleep
def test_totals_too_slow_to_compute_say_so(admin_client, history, monkeypatch):
    monkeypatch.setattr("usage.admin.TOTALS_TIMEOUT_MS", 1)
    # pg_sleep makes the aggregate outlast its 1 ms limit whatever the machine.
    monkeypatch.setattr(
        UsageLogAdmin,
        "get_queryset",
        lambda self, request: UsageLog.objects.extra(where=["pg_sleep(0.05) IS NOT NULL"]),
    )
    assert _totals(admin_client) == {"complete": False}


def test_totals_need_the_permission_to_view_usage(staff_client, history):
    client = staff_client("budgets.view_gatewayuser")
    assert client.get(reverse("admin:usage_usagelog_totals")).status_code == 403


def test_a_date_range_includes_both_days_in_utc(admin_client, history):
    _, _, _, rows = history
    both = _list(admin_client, date_from="2026-03-01", date_to="2026-03-02")
    assert _rows(both) == sorted([str(rows["a1"].pk), str(rows["a2"].pk)])
    from_day2 = _list(admin_client, date_from="2026-03-02")
    assert _rows(from_day2) == sorted(str(rows[k].pk) for k in ("a2", "b1", "b2"))
    up_to_day1 = _list(admin_client, date_to="2026-03-01")
    assert _rows(up_to_day1) == [str(rows["a1"].pk)]


def test_a_date_that_does_not_parse_is_refused_like_any_bad_filter(admin_client, history):
    response = admin_client.get(admin_url(UsageLog, "changelist"), {"date_from": "03/01/2026"})
    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")


def test_filters_by_provider_status_code_key_and_budget(admin_client, history):
    research, _, ben, rows = history
    key, _ = make_key(ben, key_name="ci")
    keyed = uuid.uuid4()
    holds.usage_record(
        record=ledger.UsageRecord(
            request_id=keyed,
            user_id=ben.pk,
            api_key_id=key.pk,
            endpoint="/v1/chat/completions",
            provider="openai",
            model="gpt-4o-mini",
            status="error",
            status_code=502,
            error_message="LLM provider error",
        ),
        now=DAY3,
    )
    assert _rows(_list(admin_client, provider="anthropic")) == [str(rows["a2"].pk)]
    assert _rows(_list(admin_client, code="429")) == [str(rows["b2"].pk)]
    assert _rows(_list(admin_client, code="4xx")) == [str(rows["b2"].pk)]
    assert _rows(_list(admin_client, code="5xx")) == [str(keyed)]
    assert _rows(_list(admin_client, key=key.key_prefix)) == [str(keyed)]
    assert _rows(_list(admin_client, key=str(key.pk))) == [str(keyed)]
    on_research = _list(admin_client, budget=research.pk)
    assert _rows(on_research) == sorted([str(rows["a1"].pk), str(rows["a2"].pk)])
    combined = _list(admin_client, budget=research.pk, provider="openai", date_to="2026-03-01")
    assert _rows(combined) == [str(rows["a1"].pk)]


def test_suggestions_for_users_models_and_keys(admin_client, history):
    set_price("openai:gpt-4o-mini")
    set_price("anthropic:claude-sonnet-4")
    _, _, ben, _ = history
    key, _ = make_key(ben, key_name="laptop")

    def suggest(kind: str, q: str) -> list[str]:
        response = admin_client.get(f"/admin/suggest/{kind}/", {"q": q})
        assert response.status_code == 200
        return [s["value"] for s in response.json()["results"]]

    assert suggest("users", "Lima") == ["ana"]
    assert suggest("users", "b") == ["ben"]
    assert suggest("models", "sonnet") == ["anthropic:claude-sonnet-4"]
    assert suggest("keys", "lapt") == [key.key_prefix]
    assert admin_client.get("/admin/suggest/passwords/").status_code == 404


def test_suggestions_need_the_permission_to_view_what_they_suggest(staff_client, history):
    client = staff_client("usage.view_usagelog")
    assert client.get("/admin/suggest/users/", {"q": "a"}).status_code == 403
    allowed = staff_client("usage.view_usagelog", "budgets.view_gatewayuser")
    assert allowed.get("/admin/suggest/users/", {"q": "a"}).json()["results"][0]["value"] == "ana"
