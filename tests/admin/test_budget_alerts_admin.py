"""Budget alerts in the console: the budget form edits the alert settings through
budgets.services (the API's rules, the API's messages), and the alerts themselves are
history: listed, filtered, exported, never added, changed or deleted."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from budgets.models import Budget, BudgetAlert, GatewayUser
from budgets.services import accounts
from budgets.services import alerts as alert_services
from tests.admin.conftest import admin_url, charge
from tests.factories import make_budget, make_key, make_user, priced

pytestmark = pytest.mark.calendar

SECRET = "T0K3N-zqxv-not-for-logs"


def _form(**overrides: str) -> dict[str, str]:
    data = {
        "name": "Research",
        "max_budget_usd": "10",
        "budget_duration_sec": "",
        "reset_alignment": "calendar_month",
        "alert_thresholds_pct": "80, 100",
        "alert_webhook_url": "",
        "alert_emails": "",
    }
    data.update(overrides)
    return data


# --- the budget form --------------------------------------------------------------------------


@pytest.mark.django_db
def test_adding_a_budget_with_alerts_stores_them_as_the_service_cleans_them(admin_client):
    response = admin_client.post(
        admin_url(Budget, "add"),
        _form(
            alert_thresholds_pct="100; 50 50",
            # A host without a dot (a container's name): the service's rule allows it.
            alert_webhook_url="http://receiver:8080/hooks/budget",
            alert_emails="ops@example.com\nlead@example.com, ops@example.com",
        ),
    )

    assert response.status_code == 302
    budget = Budget.objects.get()
    assert budget.alert_thresholds_pct == [50, 100]
    assert budget.alert_webhook_url == "http://receiver:8080/hooks/budget"
    assert budget.alert_emails == ["ops@example.com", "lead@example.com"]
    assert budget.alerts_enabled
    assert LogEntry.objects.get().action_flag == ADDITION


@pytest.mark.django_db
def test_the_add_page_offers_the_default_thresholds(admin_client):
    form = admin_client.get(admin_url(Budget, "add")).context["adminform"].form
    assert form["alert_thresholds_pct"].value() == "80, 100"
    html = admin_client.get(admin_url(Budget, "add")).content.decode()
    assert 'value="80, 100"' in html
    # Left as offered: the defaults, no target.
    admin_client.post(admin_url(Budget, "add"), _form())
    budget = Budget.objects.get()
    assert (budget.alert_thresholds_pct, budget.alert_webhook_url, budget.alert_emails) == (
        [80, 100],
        "",
        [],
    )


@pytest.mark.django_db
def test_changing_only_the_alerts_goes_through_budget_update(admin_client, monkeypatch):
    budget = make_budget(name="Ops", max_budget_usd=Decimal("5"), alert_emails=["ops@example.com"])
    page = admin_client.get(admin_url(budget, "change")).content.decode()
    assert "ops@example.com</textarea>" in page
    calls = []
    update = accounts.budget_update
    monkeypatch.setattr(accounts, "budget_update", lambda **kw: calls.append(kw) or update(**kw))

    response = admin_client.post(
        admin_url(budget, "change"),
        _form(
            name="Ops",
            max_budget_usd="5",
            reset_alignment="",
            alert_thresholds_pct="90",
            alert_webhook_url="https://hooks.example.com/x",
            alert_emails="ops@example.com",
        ),
    )

    assert response.status_code == 302
    # Only what changed is passed, to the same service the API calls.
    assert calls == [
        {
            "budget_id": budget.pk,
            "alert_thresholds_pct": [90],
            "alert_webhook_url": "https://hooks.example.com/x",
        }
    ]
    budget.refresh_from_db()
    assert budget.alert_thresholds_pct == [90]
    assert budget.alert_webhook_url == "https://hooks.example.com/x"
    assert budget.alert_emails == ["ops@example.com"]
    assert budget.max_budget_usd == Decimal("5")
    entry = LogEntry.objects.get()
    assert entry.action_flag == CHANGE
    assert "Alert at" in entry.get_change_message()
    # The log names the fields, never the URL.
    assert "hooks.example.com" not in entry.change_message

    # Emptied: no targets, no thresholds.
    admin_client.post(
        admin_url(budget, "change"),
        _form(name="Ops", max_budget_usd="5", reset_alignment="", alert_thresholds_pct=""),
    )
    budget.refresh_from_db()
    assert (budget.alert_thresholds_pct, budget.alert_webhook_url, budget.alert_emails) == (
        [],
        "",
        [],
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "alert_thresholds_pct",
            "80, ninety",
            "Enter whole percentages separated by commas, such as 80, 100.",
        ),
        ("alert_thresholds_pct", "80.5", "Enter whole percentages separated by commas"),
        ("alert_thresholds_pct", "0", "Alert thresholds must be between 1 and 1000"),
        ("alert_thresholds_pct", "1001", "Alert thresholds must be between 1 and 1000"),
        ("alert_thresholds_pct", " ".join(map(str, range(1, 12))), "At most 10 alert thresholds"),
        ("alert_webhook_url", f"ftp://hooks.example.com/{SECRET}", "must be an http(s) URL"),
        ("alert_webhook_url", f"hooks.example.com/{SECRET}", "must be an http(s) URL"),
        ("alert_emails", f"{SECRET}-not-an-address", "Enter a valid email address."),
        (
            "alert_emails",
            " ".join(f"u{i}@example.com" for i in range(21)),
            "alert emails must be a list of at most 20 addresses",
        ),
    ],
)
def test_invalid_alert_settings_are_refused_with_the_rule(admin_client, field, value, message):
    budget = make_budget(name="Kept", alert_webhook_url="https://hooks.example.com/kept")
    for url in (admin_url(Budget, "add"), admin_url(budget, "change")):
        response = admin_client.post(url, _form(**{field: value}))
        assert response.status_code == 200
        errors = response.context["adminform"].form.errors[field]
        assert any(message.lower() in error.lower() for error in errors), errors
        assert not any(SECRET in error for error in errors)
    assert list(Budget.objects.values_list("name", flat=True)) == ["Kept"]
    budget.refresh_from_db()
    assert budget.alert_webhook_url == "https://hooks.example.com/kept"
    assert budget.alert_thresholds_pct == [80, 100]
    assert not LogEntry.objects.exists()


# --- the alert list -----------------------------------------------------------------------------


@pytest.fixture
def alerts(db, receiver, monkeypatch):
    """Three alerts, as settlement raises them: alice at 80% (delivered) and 100%
    (failed: the receiver answered 404), bob at 80% (pending)."""
    monkeypatch.setattr(alert_services, "enqueue_detached_on_commit", lambda *a, **k: None)
    budget = make_budget(name="Team", max_budget_usd=Decimal("10"), alert_webhook_url=receiver.url)
    alice = make_user(budget=budget, user_id="alice")
    bob = make_user(budget=budget, user_id="bob")
    charge(alice, "8")
    (at_80,) = alert_services.budget_alerts_check(user_id=alice.pk)
    assert alert_services.budget_alert_deliver(alert_id=at_80.pk).status == "delivered"
    charge(alice, "2.5")
    (at_100,) = alert_services.budget_alerts_check(user_id=alice.pk)
    receiver.statuses.append(404)
    assert alert_services.budget_alert_deliver(alert_id=at_100.pk).status == "failed"
    charge(bob, "9")
    (bob_80,) = alert_services.budget_alerts_check(user_id=bob.pk)
    return {"budget": budget, "delivered": at_80, "failed": at_100, "pending": bob_80}


def _listed(response) -> set[int]:
    return {row.pk for row in response.context["cl"].result_list}


def test_the_alert_list_shows_who_what_and_delivery(admin_client, alerts, receiver):
    response = admin_client.get(admin_url(BudgetAlert, "changelist"))
    assert response.status_code == 200
    html = response.content.decode()
    assert _listed(response) == {a.pk for k, a in alerts.items() if k != "budget"}
    for text in ("alice", "bob", "Team", "80%", "100%", "$8.00", "$10.00"):
        assert text in html, text
    for tone, state in (("good", "delivered"), ("bad", "failed"), ("warn", "pending")):
        assert f'<span class="otari-badge otari-badge--{tone}">{state}</span>' in html
    # Where it went, but not the webhook's URL (it may carry a token).
    assert "webhook" in html
    assert receiver.url not in html

    page = admin_client.get(admin_url(alerts["failed"], "change"))
    assert page.status_code == 200
    detail = page.content.decode()
    assert "webhook: HTTP 404" in detail
    assert receiver.url not in detail
    assert 'name="_save"' not in detail


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "delivered"}, {"delivered"}),
        ({"status": "failed"}, {"failed"}),
        ({"status": "pending"}, {"pending"}),
        ({"threshold": "80"}, {"delivered", "pending"}),
        ({"threshold": "100"}, {"failed"}),
        ({"threshold": "100", "status": "pending"}, set()),
        ({"user": "bob"}, {"pending"}),
        ({"q": "alice"}, {"delivered", "failed"}),
    ],
)
def test_alert_filters(admin_client, alerts, params, expected):
    response = admin_client.get(admin_url(BudgetAlert, "changelist"), params)
    assert response.status_code == 200
    assert _listed(response) == {alerts[name].pk for name in expected}


def test_the_filter_sidebar_offers_thresholds_and_delivery_states(admin_client, alerts):
    html = admin_client.get(admin_url(BudgetAlert, "changelist")).content.decode()
    for text in (">Threshold<", ">Delivery state<", "?threshold=80", "?threshold=100"):
        assert text in html, text


def test_alerts_are_history_even_for_a_superuser(admin_client, alerts):
    alert = alerts["failed"]
    before = list(BudgetAlert.objects.order_by("pk").values())
    forged = {"status": "pending", "attempts": "0", "threshold_pct": "1"}

    assert admin_client.get(admin_url(BudgetAlert, "add")).status_code == 403
    assert admin_client.post(admin_url(BudgetAlert, "add"), forged).status_code == 403
    assert admin_client.post(admin_url(alert, "change"), forged).status_code == 403
    assert admin_client.get(admin_url(alert, "delete")).status_code == 403
    assert admin_client.post(admin_url(alert, "delete"), {"post": "yes"}).status_code == 403
    listing = admin_client.get(admin_url(BudgetAlert, "changelist"))
    assert listing.context["action_form"] is None
    admin_client.post(
        admin_url(BudgetAlert, "changelist"),
        {"action": "delete_selected", "_selected_action": [str(alert.pk)], "post": "yes"},
    )
    assert list(BudgetAlert.objects.order_by("pk").values()) == before
    assert not LogEntry.objects.exists()


def test_alerts_need_their_own_view_permission(staff_client, alerts, receiver):
    alert = alerts["pending"]
    others = staff_client("budgets.view_budget", "budgets.view_gatewayuser")
    assert others.get(admin_url(BudgetAlert, "changelist")).status_code == 403
    assert others.get(admin_url(alert, "change")).status_code == 403
    assert others.get(admin_url(BudgetAlert, "export_csv")).status_code == 403
    # Nor are they linked from the budget's and the user's pages.
    assert "alerts_link" not in _fieldset_names(others.get(admin_url(alerts["budget"], "change")))
    assert "alerts_link" not in _fieldset_names(
        others.get(admin_url(GatewayUser.objects.get(pk="bob"), "change"))
    )

    # Staff who may only view budgets see the settings in words, and the webhook's
    # host without its path (which may carry a token).
    page = others.get(admin_url(alerts["budget"], "change")).content.decode()
    host = receiver.url.removesuffix("/hooks/budget")
    assert "80%, 100%" in page
    assert f"{host}/…" in page
    assert "/hooks/budget" not in page

    viewer = staff_client("budgets.view_budgetalert")
    assert viewer.get(admin_url(BudgetAlert, "changelist")).status_code == 200
    page = viewer.get(admin_url(alert, "change"))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert viewer.post(admin_url(alert, "change"), {"status": "failed"}).status_code == 403
    alert.refresh_from_db()
    assert alert.status == "pending"


def _fieldset_names(response) -> str:
    form = response.context["adminform"]
    return " ".join(str(field) for fieldset in form for line in fieldset for field in line.fields)


def test_budget_and_user_pages_link_to_their_alerts(admin_client, alerts):
    budget_page = admin_client.get(admin_url(alerts["budget"], "change")).content.decode()
    budget_link = f"{admin_url(BudgetAlert, 'changelist')}?budget__budget_id__exact="
    assert f'<a href="{budget_link}{alerts["budget"].pk}">3 alerts</a>' in budget_page
    alice_page = admin_client.get(
        admin_url(GatewayUser.objects.get(pk="alice"), "change")
    ).content.decode()
    assert f'<a href="{admin_url(BudgetAlert, "changelist")}?user=alice">2 alerts</a>' in (
        alice_page
    )
    listed = admin_client.get(
        admin_url(BudgetAlert, "changelist"), {"budget__budget_id__exact": alerts["budget"].pk}
    )
    assert len(_listed(listed)) == 3
    quiet = make_user(user_id="quiet")
    assert "No alerts yet." in admin_client.get(admin_url(quiet, "change")).content.decode()


def test_alerts_of_a_deleted_budget_stay_listed(admin_client, alerts):
    for user_id in ("alice", "bob"):
        accounts.user_update(user_id=user_id, budget=None)
    budget_id = alerts["budget"].pk
    accounts.budget_delete(budget_id=budget_id)
    response = admin_client.get(admin_url(BudgetAlert, "changelist"))
    assert len(_listed(response)) == 3
    assert f"{budget_id} (deleted)" in response.content.decode()
    assert admin_client.get(admin_url(alerts["failed"], "change")).status_code == 200


def test_alert_csv_export(admin_client, alerts):
    response = admin_client.get(admin_url(BudgetAlert, "export_csv"), {"status": "failed"})
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(r["user_id"], r["threshold_pct"], r["status"]) for r in rows] == [
        ("alice", "100", "failed")
    ]
    assert Decimal(rows[0]["spend_usd"]) == Decimal("10.5")
    assert rows[0]["last_error"] == "webhook: HTTP 404"


def test_alert_list_query_count_is_independent_of_rows(admin_client, alerts, monkeypatch):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(admin_url(BudgetAlert, "changelist")).status_code == 200
        return len(captured)

    few = queries()
    budget = make_budget(max_budget_usd=Decimal("1"), alert_emails=["ops@example.com"])
    for i in range(30):
        user = make_user(budget=budget, user_id=f"many-{i}")
        charge(user, "1")
        alert_services.budget_alerts_check(user_id=user.pk)
    assert BudgetAlert.objects.count() == 63
    assert queries() == few


# --- end to end: a real request crosses a threshold, the console shows the alert -----------


@pytest.mark.postgres
def test_an_alert_raised_by_a_real_request_appears_in_the_console(
    gateway, receiver, django_user_model
):
    model = priced("gpt-4o-mini", "1", "1")
    budget = make_budget(
        max_budget_usd=Decimal("0.0001"), alert_thresholds_pct=[50], alert_webhook_url=receiver.url
    )
    user = make_user(budget=budget, user_id="carol")
    _, secret = make_key(user)
    for _ in range(2):  # 27 then 54 micro-dollars: the second crosses 50%
        assert gateway.chat(secret, model=model, max_tokens=20).status_code == 200
    assert len(receiver.wait_for(1)) == 1

    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", "", "pw-root-123"))
    response = client.get(admin_url(BudgetAlert, "changelist"), {"user": "carol"})
    (row,) = response.context["cl"].result_list
    assert (row.threshold_pct, row.spend_usd) == (50, Decimal("0.000054"))
    assert "$0.000054" in response.content.decode()
