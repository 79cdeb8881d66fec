"""Spend reports: per user, model and budget for a month or a range of UTC days, with
totals and CSV export; and a user's spend per day on their page."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tests.admin.conftest import admin_url, charge, fail
from tests.factories import make_budget, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def march():
    research = make_budget(name="Research", max_budget_usd=Decimal("100"))
    since = datetime(2026, 1, 1, tzinfo=UTC)
    ana = make_user(budget=research, user_id="ana", alias="Ana Lima", now=since)
    ben = make_user(budget=research, user_id="ben", alias="Ben Okafor", now=since)
    cy = make_user(user_id="cy", now=since)
    charge(ana, "1.25", at=datetime(2026, 3, 1, 0, 0, tzinfo=UTC))
    charge(
        ana, "0.000123", at=datetime(2026, 3, 19, tzinfo=UTC), provider="anthropic", model="claude"
    )
    charge(ben, "2", at=datetime(2026, 3, 31, 23, 59, tzinfo=UTC))
    fail(ben, at=datetime(2026, 3, 5, tzinfo=UTC))
    charge(cy, "7", at=datetime(2026, 2, 28, 23, 59, tzinfo=UTC))  # February
    charge(cy, "0.5", at=datetime(2026, 4, 1, 0, 0, tzinfo=UTC))  # April
    return research


def _report(client, **params):
    response = client.get(reverse("admin:otari_spend_report"), params)
    assert response.status_code == 200
    return response


def test_spend_per_user_for_a_month_with_totals(admin_client, march):
    response = _report(admin_client, by="user", month="2026-03")
    rows = [(r.key, r.requests, r.failed, r.cost_usd) for r in response.context["rows"]]
    assert rows == [("ben", 2, 1, Decimal("2")), ("ana", 2, 0, Decimal("1.250123"))]
    assert response.context["totals"]["cost_usd"] == Decimal("3.250123")
    page = response.content.decode()
    assert (
        'id="otari-report-total"><span class="otari-money" title="$3.250123 exactly">$3.25' in page
    )
    assert "Ana Lima" in page


def test_spend_per_model_and_per_budget(admin_client, march):
    models = _report(admin_client, by="model", month="2026-03").context["rows"]
    assert [(r.label, r.cost_usd) for r in models] == [
        ("openai:gpt-4o-mini", Decimal("3.25")),
        ("anthropic:claude", Decimal("0.000123")),
    ]
    budgets = _report(admin_client, by="budget", month="2026-02").context["rows"]
    assert [(r.label, r.cost_usd) for r in budgets] == [("no budget", Decimal("7"))]
    budgets = _report(admin_client, by="budget", month="2026-03").context["rows"]
    assert [(r.label, r.key, r.requests) for r in budgets] == [("Research", march.pk, 4)]


def test_a_range_of_days_includes_both_ends(admin_client, march):
    rows = _report(admin_client, by="user", date_from="2026-02-28", date_to="2026-03-01").context[
        "rows"
    ]
    assert [(r.key, r.cost_usd) for r in rows] == [("cy", Decimal("7")), ("ana", Decimal("1.25"))]
    bad = _report(admin_client, by="user", date_from="2026-03-05", date_to="2026-03-01")
    assert "the end not before the start" in bad.content.decode()


def test_csv_export_has_the_rows_and_the_total(admin_client, march):
    response = admin_client.get(
        reverse("admin:otari_spend_report"), {"by": "user", "month": "2026-03", "format": "csv"}
    )
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="spend-by-user-2026-03.csv"'
    body = b"".join(response.streaming_content).decode()
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == [
        "user", "name", "requests", "failed", "prompt_tokens", "completion_tokens", "cost_usd"
    ]  # fmt: skip
    assert [(r[0], Decimal(r[-1])) for r in rows[1:]] == [
        ("ben", Decimal("2")),
        ("ana", Decimal("1.250123")),
        ("TOTAL", Decimal("3.250123")),
    ]


def test_reports_need_the_permission_to_view_usage(staff_client, march):
    client = staff_client("budgets.view_gatewayuser")
    assert client.get(reverse("admin:otari_spend_report")).status_code == 403


def test_report_queries_do_not_grow_with_rows(admin_client, march):
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            _report(admin_client, by="user", month="2026-03")
        return len(queries)

    few = count()
    for i in range(15):
        charge(make_user(user_id=f"extra-{i}"), "0.01", at=datetime(2026, 3, 10, tzinfo=UTC))
    assert count() == few


def test_a_users_page_charts_their_spend_per_day(admin_client, march):
    with time_machine.travel(datetime(2026, 3, 20, 12, 0, tzinfo=UTC), tick=False):
        page = admin_client.get(admin_url(march.users.get(pk="ana"), "change")).content.decode()
    assert "Spend per day, last 30 days (UTC)" in page
    assert page.count('class="otari-chart__bar"') == 30
    # Ana's day, not the others': 19 March has her $0.000123.
    assert "Thu 19 Mar: $0.000123 over 1 request" in page
    assert "Sun 01 Mar: $1.25 over 1 request" in page
    # Only hers: Cy's $7 of 28 February is in the window but not on Ana's chart.
    assert "Spend per day over the last 30 days: $1.25 in total" in page
    assert "Sat 28 Feb: $0.00 over 0 requests" in page
