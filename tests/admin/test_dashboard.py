"""The spend dashboard (the admin index): the right figures, in a fixed number of
queries whatever the number of rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from common.charts import nice_ceiling
from tests.admin.conftest import charge, fail, open_hold
from tests.factories import make_budget, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.calendar]
NOW = datetime(2025, 4, 15, 15, 0, tzinfo=UTC)


@pytest.fixture
def month():
    with time_machine.travel(NOW - timedelta(days=60), tick=False):
        budget = make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=365 * 86400)
        near = make_user(budget=budget, user_id="near", alias="Nearly")
        fine = make_user(budget=budget, user_id="fine")
    alice = make_user(user_id="alice", alias="Alice A")
    bob = make_user(user_id="bob", alias="Bob B")
    charge(alice, "100", at=NOW - timedelta(days=40))  # outside the 30 days
    charge(alice, "1.50", at=NOW - timedelta(days=2), model="gpt-4o")
    charge(alice, "0.25", at=NOW - timedelta(days=2, hours=3))
    charge(bob, "3", at=NOW - timedelta(minutes=5), provider="anthropic", model="claude-sonnet")
    fail(bob, at=NOW - timedelta(hours=1), message="The provider rejected the gateway's key")
    charge(near, "9", at=NOW - timedelta(days=1))
    charge(fine, "1", at=NOW - timedelta(days=1))
    open_hold(near, "0.5", at=NOW - timedelta(seconds=30))
    open_hold(fine, "0.25", at=NOW - timedelta(days=3))  # long past its expiry
    return {"alice": alice, "bob": bob, "near": near}


@pytest.fixture
def admin_client(admin_client, admin_user):
    """Logged in at NOW: a session opened at the calendar guard's instant may have
    expired by then."""
    with time_machine.travel(NOW, tick=False):
        admin_client.force_login(admin_user)
    return admin_client


def _dashboard(client):
    with time_machine.travel(NOW, tick=False):
        response = client.get("/admin/")
    assert response.status_code == 200
    return response.context["dashboard"], response.content.decode()


def test_figures(admin_client, month):
    dash, html = _dashboard(admin_client)

    bars = dash.chart.bars
    assert len(bars) == 30
    assert bars[-1].today
    assert bars[-1].title == "Tue 15 Apr: $3.00 over 2 requests, 1 failed"
    assert bars[-3].title == "Sun 13 Apr: $1.75 over 2 requests"
    assert bars[-2].title == "Mon 14 Apr: $10.00 over 2 requests"
    assert bars[0].height == 0.0
    assert dash.chart.total_usd == Decimal("14.75")
    assert (dash.spend_today, dash.spend_window) == ("$3.00", "$14.75")
    assert (dash.requests_window, dash.errors_window, dash.error_rate) == (6, 1, "16.7%")
    # The tallest bar is the busiest day, scaled to a round axis maximum.
    assert nice_ceiling(Decimal("10")) == Decimal("10")
    assert bars[-2].height == max(b.height for b in bars)

    assert [(r.share.label, r.share.spend_usd) for r in dash.top_users] == [
        ("Nearly", Decimal("9")),
        ("Bob B", Decimal("3")),
        ("Alice A", Decimal("1.75")),
        ("fine", Decimal("1")),
    ]
    assert dash.top_users[0].percent == 100.0
    assert [(r.share.label, r.share.spend_usd) for r in dash.top_models] == [
        ("openai:gpt-4o-mini", Decimal("10.25")),
        ("anthropic:claude-sonnet", Decimal("3")),
        ("openai:gpt-4o", Decimal("1.5")),
    ]
    assert [u.user_id for u in dash.near_budget] == ["near"]  # 9 + 0.5 of 10
    assert (dash.holds.count, dash.holds.amount_usd, dash.holds.stale_count) == (
        2,
        Decimal("0.75"),
        1,
    )
    assert [e.error_message for e in dash.recent_errors] == [
        "The provider rejected the gateway's key"
    ]
    for text in ("$14.75", "95%", "Nearly", "1 stale", "Spend per day, last 30 days (UTC)"):
        assert text in html, text


def test_empty_gateway(admin_client):
    dash, html = _dashboard(admin_client)
    assert dash.chart.total_usd == 0
    assert dash.top_users == []
    assert "No spend in the last 30 days." in html
    assert "Every user is below 80% of their budget, and nobody was refused" in html
    assert "No failed requests." in html


def test_query_count_does_not_depend_on_the_number_of_rows(admin_client, month):
    with CaptureQueriesContext(connection) as few:
        _dashboard(admin_client)
    for i in range(60):
        user = make_user(user_id=f"extra-{i}")
        charge(user, "0.01", at=NOW - timedelta(days=i % 30, hours=1))
        fail(user, at=NOW - timedelta(hours=2))
    with CaptureQueriesContext(connection) as many:
        _dashboard(admin_client)
    assert len(many) == len(few)
    assert len(few) <= 12


@pytest.mark.parametrize(
    ("value", "axis"),
    [("0", "1"), ("0.0004", "0.0005"), ("0.7", "1"), ("1", "1"), ("3.2", "5"), ("21", "25")],
)
def test_axis_maximum_is_a_round_number(value, axis):
    assert nice_ceiling(Decimal(value)) == Decimal(axis)
