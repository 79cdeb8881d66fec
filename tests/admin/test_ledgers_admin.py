"""The usage log, holds and reset logs: history, read-only for everyone whatever is
POSTed, filterable, and exported as a streamed, spreadsheet-safe CSV."""

from __future__ import annotations

import csv
import io
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from budgets.models import BudgetResetLog, GatewayUser, Hold
from budgets.services import periods
from common import admin_tools
from tests.admin.conftest import admin_url, charge, fail, open_hold
from tests.factories import make_budget, make_user
from usage.models import UsageLog

pytestmark = pytest.mark.django_db


@pytest.fixture
def history():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100"), budget_duration_sec=60))
    other = make_user(user_id="other")
    ok = charge(user, "0.0123", model="gpt-4o")
    bad = fail(user, message='=HYPERLINK("http://evil")')
    charge(other, "2", provider="anthropic", model="claude-sonnet-4")
    hold = open_hold(user, "0.5")
    log = periods.user_period_reset(user_id=user.pk)
    return {"user": user, "other": other, "ok": ok, "bad": bad, "hold": hold, "reset": log}


def _actions(response) -> set[str]:
    """The action names a changelist offers (none at all: no action form)."""
    form = response.context["action_form"]
    return set() if form is None else {name for name, _ in form.fields["action"].choices}


def _rows(model):
    return list(model.objects.order_by("pk").values())


LEDGERS = [
    (UsageLog, "ok", {"cost_usd": "0", "status": "error", "user": "other"}),
    (Hold, "hold", {"amount_usd": "0", "status": "settled"}),
    (BudgetResetLog, "reset", {"previous_spend_usd": "0"}),
]


@pytest.mark.parametrize(("model", "row", "forged"), LEDGERS)
def test_ledgers_cannot_be_added_changed_or_deleted_even_by_a_superuser(
    admin_client, history, model, row, forged
):
    obj = history[row]
    before = _rows(model)

    assert admin_client.get(admin_url(model, "add")).status_code == 403
    assert admin_client.post(admin_url(model, "add"), forged).status_code == 403
    assert admin_client.post(admin_url(obj, "change"), forged).status_code == 403
    assert admin_client.get(admin_url(obj, "delete")).status_code == 403
    assert admin_client.post(admin_url(obj, "delete"), {"post": "yes"}).status_code == 403
    # The bulk delete action is not offered, and naming it anyway does nothing.
    listing = admin_client.get(admin_url(model, "changelist"))
    assert "delete_selected" not in _actions(listing)
    admin_client.post(
        admin_url(model, "changelist"),
        {"action": "delete_selected", "_selected_action": [str(obj.pk)], "post": "yes"},
    )

    assert _rows(model) == before
    assert not LogEntry.objects.exists()
    # Viewing is allowed.
    page = admin_client.get(admin_url(obj, "change"))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()


def test_usage_row_page_shows_its_money_formatted(admin_client, history):
    html = admin_client.get(admin_url(history["ok"], "change")).content.decode()
    assert "$0.0123" in html
    assert "openai:gpt-4o" in html
    assert "success · 200" in html


def test_a_failed_request_page_shows_what_the_provider_answered(admin_client, history):
    row = fail(history["user"], upstream_status_code=503, upstream_error="overloaded, retry")
    html = admin_client.get(admin_url(row, "change")).content.decode()
    assert "503" in html
    assert "overloaded, retry" in html
    # And in the list, after what the client was told.
    listing = admin_client.get(admin_url(UsageLog, "changelist")).content.decode()
    assert "LLM provider error · provider 503: overloaded, retry" in listing


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status__exact": "error"}, {"bad"}),
        ({"user": "other"}, {"other"}),
        ({"model": "anthropic:claude-sonnet-4"}, {"other"}),
        ({"model": "gpt-4o"}, {"ok"}),
        ({"endpoint": "/v1/chat/completions"}, {"ok", "bad", "other"}),
        ({"endpoint": "/v1/messages"}, set()),
    ],
)
def test_usage_filters(admin_client, history, params, expected):
    response = admin_client.get(admin_url(UsageLog, "changelist"), params)
    ids = {row.pk for row in response.context["cl"].result_list}
    names = {"ok": history["ok"].pk, "bad": history["bad"].pk}
    other_rows = set(UsageLog.objects.filter(user_id="other").values_list("pk", flat=True))
    wanted = {names[n] for n in expected if n in names} | (
        other_rows if "other" in expected else set()
    )
    assert ids == wanted


def test_usage_search_is_exact_on_request_id_or_user_id(admin_client, history):
    url = admin_url(UsageLog, "changelist")
    by_id = admin_client.get(url, {"q": str(history["ok"].pk)})
    assert [r.pk for r in by_id.context["cl"].result_list] == [history["ok"].pk]
    by_user = admin_client.get(url, {"q": "other"})
    assert {r.user_id for r in by_user.context["cl"].result_list} == {"other"}
    assert list(admin_client.get(url, {"q": "othe"}).context["cl"].result_list) == []


def test_csv_export_streams_the_filtered_list_with_formulas_escaped(admin_client, history):
    user = history["user"]
    response = admin_client.get(admin_url(UsageLog, "export_csv"), {"user": user.pk})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="usage-')
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert {r["user_id"] for r in rows} == {user.pk}
    by_id = {r["request_id"]: r for r in rows}
    ok, bad = by_id[str(history["ok"].pk)], by_id[str(history["bad"].pk)]
    assert Decimal(ok["cost_usd"]) == Decimal("0.0123")
    assert (ok["model"], ok["status"], ok["prompt_tokens"]) == ("gpt-4o", "success", "100")
    assert bad["error_message"] == '\'=HYPERLINK("http://evil")'
    # Newest first, like the list it came from.
    assert [r["request_id"] for r in rows] == [str(history["bad"].pk), str(history["ok"].pk)]


def test_csv_export_of_holds_and_resets(admin_client, history):
    holds = admin_client.get(admin_url(Hold, "export_csv"), {"status__exact": "open"})
    rows = list(csv.DictReader(io.StringIO(b"".join(holds.streaming_content).decode())))
    assert [(r["request_id"], Decimal(r["amount_usd"])) for r in rows] == [
        (str(history["hold"].pk), Decimal("0.5"))
    ]
    resets = admin_client.get(admin_url(BudgetResetLog, "export_csv"))
    [reset] = list(csv.DictReader(io.StringIO(b"".join(resets.streaming_content).decode())))
    assert Decimal(reset["previous_spend_usd"]) == Decimal("0.0123")


def test_csv_export_needs_the_view_permission(staff_client, history):
    assert staff_client().get(admin_url(UsageLog, "export_csv")).status_code == 403
    allowed = staff_client("usage.view_usagelog")
    assert allowed.get(admin_url(UsageLog, "export_csv")).status_code == 200


def _add_usage_rows(user: GatewayUser, count: int) -> None:
    now = timezone.now()
    UsageLog.objects.bulk_create(
        [
            UsageLog(
                id=uuid.uuid4(),
                user=user,
                timestamp=now - timedelta(seconds=i),
                endpoint="/v1/chat/completions",
                provider="openai",
                model="gpt-4o-mini",
                prompt_tokens=1000,
                completion_tokens=200,
                total_tokens=1200,
                cost_usd=Decimal("0.000270"),
                status="success",
                status_code=200,
                error_message="x" * 60,
                latency_ms=300,
            )
            for i in range(count)
        ],
        batch_size=5000,
    )


def _export_peak(client) -> tuple[int, int, int, list[dict]]:
    """(peak Python memory while streaming, bytes, lines, queries) of a full export."""
    response = client.get(admin_url(UsageLog, "export_csv"))
    size = lines = 0
    tracemalloc.start()
    with CaptureQueriesContext(connection) as queries:
        for chunk in response.streaming_content:
            size += len(chunk)
            lines += chunk.count(b"\n")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, size, lines, queries.captured_queries


@pytest.mark.postgres
def test_csv_export_memory_does_not_grow_with_the_number_of_rows(admin_client):
    """Rows are read from a server-side cursor in chunks and written line by line: four
    times the rows, about the same peak memory, and far less than the CSV itself."""
    user = make_user(user_id="bulk")
    _add_usage_rows(user, 10_000)
    small_peak, _small_size, small_lines, _ = _export_peak(admin_client)
    _add_usage_rows(user, 30_000)
    peak, size, lines, queries = _export_peak(admin_client)

    assert (small_lines, lines) == (10_001, 40_001)
    assert size > 9_000_000
    assert peak < small_peak * 1.5, (small_peak, peak)
    assert peak < size / 2
    # One query, through a server-side cursor read in chunks (not LIMIT/OFFSET pages).
    [select] = [q["sql"] for q in queries if "usage_usagelog" in q["sql"]]
    assert select.startswith("DECLARE")


@pytest.mark.postgres
def test_large_lists_show_an_estimated_count(admin_client, history, monkeypatch):
    monkeypatch.setattr(admin_tools.EstimatedCountPaginator, "exact_count_limit", 1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE usage_usagelog")
    response = admin_client.get(admin_url(UsageLog, "changelist"))
    assert response.context["cl"].paginator.is_estimate
    assert "about " in response.content.decode()

    monkeypatch.setattr(admin_tools.EstimatedCountPaginator, "exact_count_limit", 10_000)
    response = admin_client.get(admin_url(UsageLog, "changelist"))
    assert not response.context["cl"].paginator.is_estimate
    assert response.context["cl"].result_count == 3


def test_date_drill_down_reads_only_the_first_and_last_dates(admin_client):
    user = make_user()
    for when in (
        datetime(2024, 12, 30, tzinfo=UTC),
        datetime(2025, 1, 15, tzinfo=UTC),
        datetime(2025, 2, 3, tzinfo=UTC),
    ):
        fail(user, at=when)
    url = admin_url(UsageLog, "changelist")

    with CaptureQueriesContext(connection) as queries:
        years = admin_client.get(url)
    assert "DISTINCT" not in " ".join(q["sql"] for q in queries.captured_queries)
    html = years.content.decode()
    assert "timestamp__year=2024" in html
    assert "timestamp__year=2025" in html

    months = admin_client.get(url, {"timestamp__year": "2025"}).content.decode()
    assert "timestamp__month=1" in months
    assert "timestamp__month=2" in months
    assert "timestamp__month=3" not in months
    days = admin_client.get(url, {"timestamp__year": "2025", "timestamp__month": "2"})
    assert [r.timestamp.day for r in days.context["cl"].result_list] == [3]
    assert "timestamp__day=3" in days.content.decode()


def test_release_stale_holds_button_and_action(admin_client):
    user = make_user()
    stale = open_hold(user, "0.3", at=timezone.now() - timedelta(days=1))
    other_stale = open_hold(user, "0.2", at=timezone.now() - timedelta(days=1))
    live = open_hold(user, "0.1")

    admin_client.post(
        admin_url(Hold, "changelist"),
        {"action": "release_selected_stale", "_selected_action": [str(stale.pk), str(live.pk)]},
    )
    assert Hold.objects.get(pk=stale.pk).status == Hold.Status.EXPIRED
    assert Hold.objects.get(pk=live.pk).status == Hold.Status.OPEN
    assert GatewayUser.objects.get(pk=user.pk).reserved_usd == Decimal("0.3")

    assert admin_client.get(admin_url(Hold, "release_stale")).status_code == 302
    assert Hold.objects.get(pk=other_stale.pk).status == Hold.Status.OPEN  # GET changes nothing
    response = admin_client.post(admin_url(Hold, "release_stale"), follow=True)
    assert "Released 1 stale hold." in response.content.decode()
    assert Hold.objects.get(pk=other_stale.pk).status == Hold.Status.EXPIRED
    assert GatewayUser.objects.get(pk=user.pk).reserved_usd == Decimal("0.1")
    # Both releases are in the admin log, one entry per hold.
    assert sorted(LogEntry.objects.values_list("object_id", flat=True)) == sorted(
        [str(stale.pk), str(other_stale.pk)]
    )
    assert "$0.30 of" in LogEntry.objects.get(object_id=str(stale.pk)).change_message


def test_releasing_holds_needs_the_right_to_change_users(staff_client):
    user = make_user()
    stale = open_hold(user, "0.3", at=timezone.now() - timedelta(days=1))
    viewer = staff_client("budgets.view_hold")
    assert viewer.post(admin_url(Hold, "release_stale")).status_code == 403
    listing = viewer.get(admin_url(Hold, "changelist"))
    assert "release_selected_stale" not in _actions(listing)
    assert "Release stale holds" not in listing.content.decode()
    viewer.post(
        admin_url(Hold, "changelist"),
        {"action": "release_selected_stale", "_selected_action": [str(stale.pk)]},
    )
    assert Hold.objects.get(pk=stale.pk).status == Hold.Status.OPEN

    operator = staff_client("budgets.view_hold", "budgets.change_gatewayuser")
    assert operator.post(admin_url(Hold, "release_stale")).status_code == 302
    assert Hold.objects.get(pk=stale.pk).status == Hold.Status.EXPIRED


@pytest.mark.postgres
# 5,000 usage rows written directly, to export: not charged, so the books cannot balance.
@pytest.mark.books_unbalanced
def test_csv_export_is_streamed_by_the_asgi_server(gateway, django_user_model):
    """Through uvicorn and the real ASGI app: the export is an async stream (Django would
    otherwise read a sync iterator to the end first, and warn), complete and in order."""
    import warnings

    import httpx

    _add_usage_rows(make_user(user_id="bulk"), 5_000)
    django_user_model.objects.create_superuser("root", "", "pw-root-123")
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        client.get("/admin/login/")
        login = client.post(
            "/admin/login/",
            data={
                "username": "root",
                "password": "pw-root-123",
                "csrfmiddlewaretoken": client.cookies["csrftoken"],
                "next": "/admin/",
            },
        )
        assert login.status_code == 302
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with client.stream("GET", admin_url(UsageLog, "export_csv")) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/csv; charset=utf-8"
                chunks = list(response.iter_raw())
    body = b"".join(chunks).decode()
    lines = body.splitlines()
    assert len(lines) == 5_001
    assert lines[0].startswith("request_id,timestamp,user_id,api_key_prefix")
    stamps = [row["timestamp"] for row in csv.DictReader(io.StringIO(body))]
    assert stamps == sorted(stamps, reverse=True)
    assert not [w for w in caught if "consume synchronous iterators" in str(w.message)]
