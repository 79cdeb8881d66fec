"""Changelists and change pages cost a fixed number of queries, however many rows they
show: related rows are joined (list_select_related) or annotated, never fetched per row."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from budgets.models import APIKey, Budget, BudgetResetLog, GatewayUser, Hold
from budgets.services import periods
from tests.admin.conftest import admin_url, charge, fail, open_hold
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import ModelPricing, UsageLog

pytestmark = pytest.mark.django_db


def _grow(n: int, offset: int) -> None:
    """n more users on their own budgets, each with a key, a request, a failure, an open
    hold, a reset and a price: every changelist gets n more rows."""
    for i in range(offset, offset + n):
        budget = make_budget(name=f"b{i}", max_budget_usd=Decimal("10"), budget_duration_sec=60)
        user = make_user(budget=budget, user_id=f"u{i:03}", alias=f"User {i}")
        _key, _ = make_key(user, key_name=f"k{i}")
        charge(user, "0.5")
        fail(user)
        open_hold(user, "0.01")
        periods.user_period_reset(user_id=user.pk)
        set_price(f"openai:model-{i}", effective_at=timezone.now() - timedelta(days=1))


PAGES = [
    (Budget, {}),
    (GatewayUser, {}),
    (GatewayUser, {"usage": "near"}),
    (APIKey, {}),
    (ModelPricing, {}),
    (UsageLog, {}),
    (UsageLog, {"status__exact": "error"}),
    (Hold, {}),
    (BudgetResetLog, {}),
]


def _queries(client, model, params) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(admin_url(model, "changelist"), params)
    assert response.status_code == 200
    return len(queries)


@pytest.mark.parametrize(("model", "params"), PAGES)
def test_changelist_query_count_is_independent_of_rows(admin_client, model, params):
    _grow(2, 0)
    few = _queries(admin_client, model, params)
    _grow(40, 2)
    many = _queries(admin_client, model, params)
    assert model.objects.count() >= 42
    assert many == few, f"{model.__name__}: {few} queries with 2 rows, {many} with 42+"


# The usage log adds its provider and budget filters' choices (one small query each); its
# totals are fetched separately (usage.admin.UsageLogAdmin.totals_view).
@pytest.mark.parametrize(("model", "limit"), [(UsageLog, 10), (GatewayUser, 8), (Hold, 8)])
def test_changelists_stay_within_a_small_query_budget(
    admin_client, django_assert_max_num_queries, model, limit
):
    _grow(30, 0)
    with django_assert_max_num_queries(limit):
        admin_client.get(admin_url(model, "changelist"))


def test_change_pages_with_many_related_rows(admin_client):
    budget = make_budget(max_budget_usd=Decimal("100"), budget_duration_sec=3600)
    user = make_user(budget=budget, user_id="busy")
    for _ in range(3):
        make_key(user)
        charge(user, "0.01")

    def count(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(url).status_code == 200
        return len(queries)

    # Warm the session and the per-model caches (content types) first.
    count(admin_url(user, "change"))
    count(admin_url(budget, "change"))
    few_user, few_budget = count(admin_url(user, "change")), count(admin_url(budget, "change"))
    for i in range(30):
        make_key(user)
        charge(user, "0.01")
        make_user(budget=budget, user_id=f"peer-{i}")
    assert count(admin_url(user, "change")) == few_user
    assert count(admin_url(budget, "change")) == few_budget


def test_usage_totals_cost_one_aggregate_whatever_the_rows(admin_client):
    _grow(2, 0)
    url = admin_url(UsageLog, "changelist") + "totals.json"
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    _grow(20, 2)
    with CaptureQueriesContext(connection) as many:
        assert admin_client.get(url).json()["requests"] == 44
    assert len(many) == len(few)
