"""Budgets in the console: listed with their users' money, created and changed through
budgets.services, validated with plain messages, deleted only when empty."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry

from budgets.models import Budget, GatewayUser
from tests.admin.conftest import admin_url, charge, open_hold
from tests.factories import make_budget, make_user

pytestmark = pytest.mark.django_db


def _form(**overrides: str) -> dict[str, str]:
    data = {
        "name": "Research",
        "max_budget_usd": "25.50",
        "budget_duration_sec": "",
        "reset_alignment": "calendar_month",
    }
    data.update(overrides)
    return data


def test_changelist_shows_limit_period_users_and_their_money(admin_client):
    budget = make_budget(
        name="Research", max_budget_usd=Decimal("10"), reset_alignment="calendar_month"
    )
    alice = make_user(budget=budget, user_id="alice")
    bob = make_user(budget=budget, user_id="bob")
    charge(alice, "1.25")
    charge(bob, "0.50")
    open_hold(bob, "0.02")
    make_budget(name="Open bar", max_budget_usd=None, budget_duration_sec=86400)

    response = admin_client.get(admin_url(Budget, "changelist"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Research" in html
    assert "$10.00" in html
    assert "Monthly, on the 1st (UTC)" in html
    assert "$1.75" in html  # total spend of both users this period
    assert "$0.02" in html  # reserved now
    assert ">2</a>" in html  # two users, linking to the filtered user list
    assert "Every 1 day" in html
    assert "uncapped" in html


def test_change_page_lists_the_users_with_their_usage(admin_client):
    budget = make_budget(max_budget_usd=Decimal("2"), budget_duration_sec=3600)
    user = make_user(budget=budget, user_id="carol", alias="Carol")
    charge(user, "1.70")

    response = admin_client.get(admin_url(budget, "change"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "carol" in html
    assert "$1.70" in html
    assert "otari-usage--near" in html
    assert ">85%<" in html


def test_adding_a_budget_creates_it_and_logs_the_change(admin_client, admin_user):
    response = admin_client.post(admin_url(Budget, "add"), _form())

    assert response.status_code == 302
    budget = Budget.objects.get()
    assert (budget.name, budget.max_budget_usd, budget.reset_alignment) == (
        "Research",
        Decimal("25.50"),
        "calendar_month",
    )
    assert budget.budget_duration_sec is None
    entry = LogEntry.objects.get()
    assert (entry.action_flag, entry.object_id, entry.user_id) == (
        ADDITION,
        budget.pk,
        admin_user.pk,
    )


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"max_budget_usd": "-1"}, "max_budget_usd", "Amounts cannot be negative."),
        (
            {"max_budget_usd": "1.00000000001"},
            "max_budget_usd",
            "Use at most 10 decimal places.",
        ),
        (
            {"max_budget_usd": "1000000000000"},
            "max_budget_usd",
            "Amounts cannot exceed $999,999,999,999.",
        ),
        (
            {"max_budget_usd": "ten dollars"},
            "max_budget_usd",
            "Enter an amount in US dollars, such as 25 or 0.50.",
        ),
        (
            {"budget_duration_sec": "3600"},
            "reset_alignment",
            "Choose a rolling period or a calendar period, not both.",
        ),
        (
            {"budget_duration_sec": "0", "reset_alignment": ""},
            "budget_duration_sec",
            "The period must be at least one second.",
        ),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(admin_client, overrides, field, message):
    response = admin_client.post(admin_url(Budget, "add"), _form(**overrides))

    assert response.status_code == 200
    assert message in response.context["adminform"].form.errors[field]
    assert not Budget.objects.exists()
    assert not LogEntry.objects.exists()


def test_the_largest_allowed_limit_is_accepted_exactly(admin_client):
    admin_client.post(admin_url(Budget, "add"), _form(max_budget_usd="999999999999.0000000001"))
    assert not Budget.objects.exists()  # over the maximum of docs/SPEC.md §3.1 by a hair
    admin_client.post(admin_url(Budget, "add"), _form(max_budget_usd="999999999999"))
    assert Budget.objects.get().max_budget_usd == Decimal("999999999999")


def test_changing_the_limit_goes_through_the_service(admin_client):
    budget = make_budget(name="Team", max_budget_usd=Decimal("5"), reset_alignment="calendar_day")
    response = admin_client.post(
        admin_url(budget, "change"), _form(name="Team", max_budget_usd="7.125")
    )

    assert response.status_code == 302
    budget.refresh_from_db()
    assert budget.max_budget_usd == Decimal("7.125")
    assert budget.reset_alignment == "calendar_month"
    entry = LogEntry.objects.get()
    assert entry.action_flag == CHANGE
    assert "Limit (USD per period)" in entry.get_change_message()


def test_changing_the_period_re_times_the_users_windows(admin_client):
    with time_machine.travel(datetime(2025, 3, 10, 12, 0, tzinfo=UTC), tick=False):
        budget = make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_month")
        user = make_user(budget=budget)
        charge(user, "1.00")
        assert user.__class__.objects.get(pk=user.pk).next_budget_reset_at == datetime(
            2025, 4, 1, tzinfo=UTC
        )
        admin_client.post(
            admin_url(budget, "change"),
            _form(name=budget.name, max_budget_usd="5", reset_alignment="calendar_week"),
        )

    user.refresh_from_db()
    assert user.next_budget_reset_at == datetime(2025, 3, 17, tzinfo=UTC)  # next Monday
    assert user.spend_usd == Decimal("1.00")  # spend so far is kept


def test_a_budget_with_users_cannot_be_deleted(admin_client):
    budget = make_budget()
    make_user(budget=budget, user_id="dave")

    page = admin_client.get(admin_url(budget, "delete"))
    assert "would require deleting the following protected related objects" in (
        page.content.decode()
    )
    response = admin_client.post(admin_url(budget, "delete"), {"post": "yes"})

    assert response.status_code == 200
    assert Budget.objects.filter(pk=budget.pk).exists()
    assert not LogEntry.objects.exists()


def test_an_empty_budget_is_deleted_and_the_deletion_logged(admin_client):
    budget = make_budget(name="Old")
    response = admin_client.post(admin_url(budget, "delete"), {"post": "yes"})

    assert response.status_code == 302
    assert not Budget.objects.exists()
    assert LogEntry.objects.get().action_flag == DELETION


def test_bulk_delete_skips_budgets_in_use(admin_client):
    empty, used = make_budget(name="empty"), make_budget(name="used")
    make_user(budget=used)
    admin_client.post(
        admin_url(Budget, "changelist"),
        {"action": "delete_selected", "_selected_action": [empty.pk], "post": "yes"},
    )
    assert list(Budget.objects.values_list("name", flat=True)) == ["used"]
    assert GatewayUser.objects.filter(budget=used).exists()
