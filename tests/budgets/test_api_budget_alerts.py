"""Budget alert settings and the alert list over HTTP, through the ASGI app (issues 4 and 6):
the settings are validated by the same service rules as everywhere, refused without
echoing the value, and the list shows what a real crossing raised and how it was delivered.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from budgets.models import Budget, BudgetAlert, GatewayUser
from tests.factories import make_budget, make_key, make_user, priced

pytestmark = pytest.mark.calendar

# A token in a webhook URL is a secret: it must never come back in an error.
SECRET = "T0K3N-zqxv-not-for-logs"


def wait_until(condition, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


# --- settings on create, get, list, update ----------------------------------------------------


def test_alert_settings_are_created_read_and_updated(admin):
    created = admin.post(
        "/v1/budgets",
        json={
            "name": "team",
            "max_budget": 10,
            "alert_thresholds_pct": [100, 50, 50],
            "alert_webhook_url": f"https://hooks.example.com/{SECRET}",
            "alert_emails": ["ops@example.com", "lead@example.com", "ops@example.com"],
        },
    )
    assert created.status_code == 200
    body = created.json()
    # Stored as the service cleans them: sorted, unique.
    assert body["alert_thresholds_pct"] == [50, 100]
    assert body["alert_webhook_url"] == f"https://hooks.example.com/{SECRET}"
    assert body["alert_emails"] == ["ops@example.com", "lead@example.com"]
    budget = Budget.objects.get(pk=body["budget_id"])
    assert (budget.alert_thresholds_pct, budget.alert_emails) == (
        [50, 100],
        ["ops@example.com", "lead@example.com"],
    )
    assert budget.alerts_enabled
    assert admin.get(f"/v1/budgets/{budget.pk}").json() == body
    (listed,) = admin.get("/v1/budgets").json()
    assert listed == body

    # Other changes leave the alert settings alone.
    renamed = admin.patch(f"/v1/budgets/{budget.pk}", json={"name": "renamed"}).json()
    assert renamed["alert_thresholds_pct"] == [50, 100]
    assert renamed["alert_emails"] == ["ops@example.com", "lead@example.com"]

    # null clears a target; [] turns the thresholds off.
    cleared = admin.patch(
        f"/v1/budgets/{budget.pk}", json={"alert_webhook_url": None, "alert_emails": None}
    )
    assert cleared.status_code == 200
    assert (cleared.json()["alert_webhook_url"], cleared.json()["alert_emails"]) == ("", [])
    off = admin.patch(f"/v1/budgets/{budget.pk}", json={"alert_thresholds_pct": []}).json()
    assert off["alert_thresholds_pct"] == []
    budget.refresh_from_db()
    assert (budget.alert_thresholds_pct, budget.alert_webhook_url, budget.alert_emails) == (
        [],
        "",
        [],
    )
    assert budget.max_budget_usd == Decimal("10")
    assert budget.name == "renamed"


def test_defaults_without_alert_settings(admin):
    body = admin.post("/v1/budgets", json={"name": "plain"}).json()
    assert (body["alert_thresholds_pct"], body["alert_webhook_url"], body["alert_emails"]) == (
        [80, 100],
        "",
        [],
    )
    assert not Budget.objects.get().alerts_enabled


@pytest.mark.parametrize(
    ("alert_settings", "rule"),
    [
        ({"alert_thresholds_pct": [0]}, "between 1 and 1000"),
        ({"alert_thresholds_pct": [1001]}, "between 1 and 1000"),
        ({"alert_thresholds_pct": [80, "90"]}, "whole percentages"),
        ({"alert_thresholds_pct": [80.5]}, "whole percentages"),
        ({"alert_thresholds_pct": [True]}, "whole percentages"),
        ({"alert_thresholds_pct": list(range(1, 12))}, "at most 10"),
        ({"alert_thresholds_pct": 80}, "must be a list"),
        ({"alert_webhook_url": f"ftp://hooks.example.com/{SECRET}"}, "http(s) URL"),
        ({"alert_webhook_url": f"http:///{SECRET}"}, "http(s) URL"),
        ({"alert_webhook_url": f"{SECRET} not a url"}, "http(s) URL"),
        ({"alert_webhook_url": 5}, "http(s) URL"),
        ({"alert_webhook_url": f"https://{SECRET}.example.com/" + "x" * 2000}, "http(s) URL"),
        ({"alert_emails": [f"{SECRET}-not-an-address"]}, "valid email"),
        ({"alert_emails": "ops@example.com"}, "at most 20"),
        ({"alert_emails": [5]}, "email addresses"),
        ({"alert_emails": [f"u{i}@example.com" for i in range(21)]}, "at most 20"),
    ],
)
def test_invalid_alert_settings_are_422_naming_the_rule_never_the_value(
    admin, alert_settings, rule
):
    refused = admin.post("/v1/budgets", json={"name": "x", **alert_settings})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert rule in detail
    assert SECRET not in refused.text
    assert "ftp" not in detail
    assert not Budget.objects.exists()

    budget = make_budget(alert_webhook_url="https://hooks.example.com/kept")
    refused = admin.patch(f"/v1/budgets/{budget.pk}", json={"max_budget": 3, **alert_settings})
    assert refused.status_code == 422
    assert SECRET not in refused.text
    # Nothing of the request was applied.
    budget.refresh_from_db()
    assert (budget.max_budget_usd, budget.alert_webhook_url) == (
        None,
        "https://hooks.example.com/kept",
    )
    assert (budget.alert_thresholds_pct, budget.alert_emails) == ([80, 100], [])


def test_null_thresholds_are_refused(admin):
    refused = admin.post("/v1/budgets", json={"alert_thresholds_pct": None})
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("alert_thresholds_pct:")


# --- the alert list ------------------------------------------------------------------------------


@pytest.mark.postgres
def test_alerts_raised_by_real_requests_are_listed_with_their_delivery(
    admin, gateway, receiver, time_machine
):
    # A calendar month that does not end during the test (found at 23:59:59 on the last
    # day of a month by the calendar guard, tests/conftest.py).
    time_machine.move_to(datetime(2025, 1, 15, 12, tzinfo=UTC), tick=True)
    # $1 per million tokens both ways: each request costs 27 tokens = $0.000027. With a
    # limit of $0.0001, 25% is crossed by the 1st request and 50% by the 2nd.
    model = priced("gpt-4o-mini", "1", "1")
    created = admin.post(
        "/v1/budgets",
        json={
            "max_budget": 0.0001,
            "reset_alignment": "calendar_month",
            "alert_thresholds_pct": [25, 50],
            "alert_webhook_url": receiver.url,
        },
    ).json()
    budget_id = created["budget_id"]
    assert admin.post("/v1/users", json={"user_id": "alice", "budget_id": budget_id}).is_success
    other = make_user(budget=Budget.objects.get(pk=budget_id), user_id="bob")
    _, secret = make_key(GatewayUser.objects.get(pk="alice"))
    assert admin.get(f"/v1/budgets/{budget_id}/alerts").json() == []

    for expected_calls in (1, 2, 2):
        assert gateway.chat(secret, model=model, max_tokens=20).status_code == 200
        receiver.wait_for(expected_calls)
    wait_until(lambda: BudgetAlert.objects.filter(status="delivered").count() == 2)

    response = admin.get(f"/v1/budgets/{budget_id}/alerts")
    assert response.status_code == 200
    alerts = response.json()
    assert [(a["user_id"], a["threshold_pct"]) for a in alerts] == [("alice", 50), ("alice", 25)]
    newest = alerts[0]
    row = BudgetAlert.objects.get(threshold_pct=50)
    alice = row.user
    assert newest == {
        "id": row.pk,
        "budget_id": budget_id,
        "user_id": "alice",
        "threshold_pct": 50,
        "spend": 0.000054,
        "limit": 0.0001,
        "period_started_at": alice.budget_started_at.isoformat(),
        "period_ends_at": alice.next_budget_reset_at.isoformat(),
        "status": "delivered",
        "channels": ["webhook"],
        "webhook_delivered_at": row.webhook_delivered_at.isoformat(),
        "email_delivered_at": None,
        "attempts": 1,
        "last_attempt_at": row.last_attempt_at.isoformat(),
        "last_error": "",
        "created_at": row.created_at.isoformat(),
    }
    # The alert the webhook received is the one listed.
    assert {call["json"]["alert_id"] for call in receiver.calls} == {a["id"] for a in alerts}
    # The URL (it may carry a token) is not part of the alert list.
    assert receiver.url not in response.text

    # Pages, newest first; and per user.
    url = f"/v1/budgets/{budget_id}/alerts"
    assert [a["threshold_pct"] for a in admin.get(f"{url}?limit=1").json()] == [50]
    assert [a["threshold_pct"] for a in admin.get(f"{url}?skip=1").json()] == [25]
    assert admin.get(f"/v1/budgets/{budget_id}/alerts?user_id={other.pk}").json() == []
    assert len(admin.get(f"/v1/budgets/{budget_id}/alerts?user_id=alice").json()) == 2
    for query in ("limit=0", "limit=1001", "skip=-1", "limit=abc"):
        bad = admin.get(f"/v1/budgets/{budget_id}/alerts?{query}")
        assert bad.status_code == 422, query
        assert set(bad.json()) == {"detail"}

    # History outlives the budget, as reset logs do.
    for user_id in ("alice", "bob"):
        assert admin.patch(f"/v1/users/{user_id}", json={"budget_id": None}).is_success
    assert admin.delete(f"/v1/budgets/{budget_id}").status_code == 204
    kept = admin.get(f"/v1/budgets/{budget_id}/alerts")
    assert kept.status_code == 200
    assert [a["id"] for a in kept.json()] == [a["id"] for a in alerts]


def test_alert_list_of_an_unknown_budget_is_404(admin):
    response = admin.get("/v1/budgets/nope/alerts")
    assert response.status_code == 404
    assert response.json() == {"detail": "Budget 'nope' not found"}
    assert admin.get(f"/v1/budgets/{make_budget().pk}/alerts").json() == []


def test_alert_routes_need_the_master_key(gateway, admin):
    budget = make_budget()
    _, user_key = make_key(make_user(budget=budget))
    body = {"alert_webhook_url": f"https://hooks.example.com/{SECRET}"}
    with gateway.client() as anonymous:
        assert anonymous.get(f"/v1/budgets/{budget.pk}/alerts").status_code == 401
        assert anonymous.patch(f"/v1/budgets/{budget.pk}", json=body).status_code == 401
    with gateway.client(user_key) as user:
        assert user.get(f"/v1/budgets/{budget.pk}/alerts").status_code == 403
        assert user.patch(f"/v1/budgets/{budget.pk}", json=body).status_code == 403
        assert user.post("/v1/budgets", json=body).status_code == 403
    budget.refresh_from_db()
    assert budget.alert_webhook_url == ""
    assert Budget.objects.count() == 1


def test_openapi_describes_the_alert_settings_and_list(gateway):
    with gateway.client() as client:
        schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    settings = components["BudgetSettingsRequest"]["properties"]
    assert settings["alert_thresholds_pct"]["type"] == "array"
    assert settings["alert_thresholds_pct"]["items"]["maximum"] == 1000
    assert settings["alert_emails"]["maxItems"] == 20
    assert settings["alert_webhook_url"]["type"] == "string"
    response = components["BudgetResponse"]
    for field in ("alert_thresholds_pct", "alert_webhook_url", "alert_emails"):
        assert field in response["required"]
    alerts = schema["paths"]["/v1/budgets/{budget_id}/alerts"]["get"]
    assert alerts["operationId"] == "budgets_alerts"
    assert {"skip", "limit", "user_id"} <= {p["name"] for p in alerts["parameters"]}
    assert set(alerts["responses"]) >= {"200", "401", "403", "404", "422"}
    item = components["BudgetAlertResponse"]["properties"]
    status = components[item["status"]["$ref"].rsplit("/", 1)[1]]
    assert status["enum"] == ["pending", "delivered", "failed"]
    assert "webhook_url" not in item
