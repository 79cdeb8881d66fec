"""A user refused for budget is shown as such, in the API, the console and the alerts,
whatever share of the limit it has spent (a refusal counts as reaching 100%)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.models import BudgetAlert
from budgets.services import alerts, holds
from tests.admin.conftest import admin_url
from tests.budgets.ledger import charge
from tests.factories import make_budget, make_key, make_user, set_price
from usage import ledger

# PostgreSQL: the alert check a refusal starts writes while the next request does, which
# the embedded SQLite test database refuses ("table is locked") rather than queues.
pytestmark = [pytest.mark.calendar, pytest.mark.postgres]

MODEL = "openai:gpt-4o-mini"


@pytest.fixture
def at_96(receiver):
    """A user at 96% of $0.001 (spent through the services), alerts at 50/80/100%, in a
    30-day window that does not end during the test, whatever the instant."""
    set_price()
    budget = make_budget(
        max_budget_usd=Decimal("0.001"),
        budget_duration_sec=30 * 86400,
        alert_webhook_url=receiver.url,
        alert_thresholds_pct=[50, 80, 100],
    )
    user = make_user(budget=budget, user_id="ninety-six")
    charge(user.pk, Decimal("0.00096"), timezone.now())
    _, secret = make_key(user)
    return user, secret


def _wait_for_alerts(count: int) -> list[int]:
    deadline = time.monotonic() + 15
    while BudgetAlert.objects.count() < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(BudgetAlert.objects.values_list("threshold_pct", flat=True))


def test_a_refusal_counts_as_reaching_100_percent_once_per_period(gateway, at_96, receiver):
    _user, secret = at_96
    # The settlement that took spend to 96% crossed 50% and 80% (services, no alert
    # task there): the sweep-free path under test is the refusal's.
    assert BudgetAlert.objects.count() == 0
    for _ in range(3):
        assert gateway.chat(secret, model=MODEL, max_tokens=500).status_code == 403
    assert _wait_for_alerts(3) == [50, 80, 100]
    calls = receiver.wait_for(3)
    assert sorted(c["json"]["threshold"] for c in calls) == [50, 80, 100]
    # More refusals in the same period raise nothing more.
    assert gateway.chat(secret, model=MODEL, max_tokens=500).status_code == 403
    assert _wait_for_alerts(4) == [50, 80, 100]


def test_the_api_tells_who_was_refused_in_this_period(gateway, admin, at_96):
    user, secret = at_96
    assert admin.get(f"/v1/users/{user.pk}").json()["budget_refused_at"] is None

    refused = gateway.chat(secret, model=MODEL, max_tokens=500)
    assert refused.status_code == 403

    body = admin.get(f"/v1/users/{user.pk}").json()
    refused_at = datetime.fromisoformat(body["budget_refused_at"])
    assert abs(refused_at - timezone.now()) < timedelta(seconds=30)
    listed = {u["user_id"]: u for u in admin.get("/v1/users").json()}
    assert listed[user.pk]["budget_refused_at"] == body["budget_refused_at"]


def test_a_new_period_forgets_the_refusal(gateway, admin, at_96, time_machine):
    user, secret = at_96
    assert gateway.chat(secret, model=MODEL, max_tokens=500).status_code == 403
    user.refresh_from_db()
    time_machine.move_to(user.next_budget_reset_at + timedelta(minutes=1), tick=True)
    # The next request rolls the period; it fits and is served.
    assert gateway.chat(secret, model=MODEL, max_tokens=5).status_code == 200
    assert admin.get(f"/v1/users/{user.pk}").json()["budget_refused_at"] is None


def test_the_console_shows_a_refused_user_as_out_of_budget(gateway, at_96, admin_client):
    user, secret = at_96
    listing = admin_client.get(admin_url(user, "changelist")).content.decode()
    assert "otari-usage--near" in listing
    assert "otari-usage__refused" not in listing
    dashboard = admin_client.get("/admin/").content.decode()
    assert "Every user is below 80%" not in dashboard  # 96% is near

    assert gateway.chat(secret, model=MODEL, max_tokens=500).status_code == 403

    listing = admin_client.get(admin_url(user, "changelist")).content.decode()
    assert "otari-usage--over" in listing
    assert "otari-usage__refused" in listing
    over = admin_client.get(admin_url(user, "changelist"), {"usage": "over"})
    assert [u.pk for u in over.context["cl"].result_list] == [user.pk]
    page = admin_client.get(admin_url(user, "change")).content.decode()
    assert "requests do not fit what is left" in page
    dashboard = admin_client.get("/admin/")
    assert [u.pk for u in dashboard.context["dashboard"].refused_budget] == [user.pk]
    assert user.pk in dashboard.content.decode().split('id="otari-refused-budget"')[1]


def test_the_alert_sweep_finds_a_refusal_it_missed(db, receiver):
    set_price()
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    budget = make_budget(
        max_budget_usd=Decimal("1"),
        reset_alignment="calendar_month",
        alert_webhook_url=receiver.url,
        alert_thresholds_pct=[100],
    )
    user = make_user(budget=budget, user_id="swept", now=now)
    holds.usage_record(
        record=ledger.UsageRecord(
            request_id=uuid.uuid4(),
            user_id=user.pk,
            api_key_id=None,
            endpoint="/v1/chat/completions",
            provider="openai",
            model="gpt-4o-mini",
            status="error",
            status_code=403,
            error_message="Budget exceeded",
            error_code="budget_exceeded",
        ),
        now=now,
    )
    swept = alerts.budget_alerts_sweep(now=now + timedelta(minutes=1))
    assert [(a.user_id, a.threshold_pct) for a in swept.created] == [("swept", 100)]
