"""Only staff with the right model permissions see or change anything; CSRF is enforced;
anonymous visitors are sent to the login page."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from budgets.models import APIKey, Budget, BudgetResetLog, GatewayUser, Hold
from tests.admin.conftest import admin_url, charge, open_hold
from tests.factories import make_budget, make_key, make_user
from usage.models import ModelPricing, UsageLog

pytestmark = pytest.mark.django_db

MODELS = [Budget, GatewayUser, APIKey, ModelPricing, UsageLog, Hold, BudgetResetLog]


@pytest.fixture
def rows():
    budget = make_budget(name="B", max_budget_usd=Decimal("10"), budget_duration_sec=60)
    user = make_user(budget=budget, user_id="u1")
    key, _ = make_key(user)
    from tests.factories import set_price

    price = set_price()
    usage = charge(user, "0.5")
    hold = open_hold(user, "0.1")
    from budgets.services.periods import user_period_reset

    reset = user_period_reset(user_id=user.pk)
    return {
        Budget: budget,
        GatewayUser: user,
        APIKey: key,
        ModelPricing: price,
        UsageLog: usage,
        Hold: hold,
        BudgetResetLog: reset,
    }


def _pages(rows) -> list[str]:
    urls = []
    for model in MODELS:
        urls += [admin_url(model, "changelist"), admin_url(rows[model], "change")]
    return urls


def test_anonymous_visitors_are_sent_to_the_login_page(client, rows):
    for url in [*_pages(rows), "/admin/", admin_url(UsageLog, "export_csv")]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url


def test_non_staff_users_cannot_log_in(client, rows):
    get_user_model().objects.create_user("alice", password="pw-alice-123")
    response = client.post(
        "/admin/login/", {"username": "alice", "password": "pw-alice-123", "next": "/admin/"}
    )
    assert response.status_code == 200
    assert "correct username and password for a staff account" in response.content.decode()
    assert client.get("/admin/").status_code == 302


@pytest.mark.parametrize("model", MODELS)
def test_staff_without_the_model_permission_get_403(staff_client, rows, model):
    other = {Budget: "budgets.view_apikey"}.get(model, "budgets.view_budget")
    client = staff_client(other)
    obj = rows[model]
    assert client.get(admin_url(model, "changelist")).status_code == 403
    assert client.get(admin_url(obj, "change")).status_code == 403
    assert client.post(admin_url(obj, "change"), {}).status_code == 403
    assert client.get(admin_url(model, "add")).status_code == 403
    assert client.post(admin_url(obj, "delete"), {"post": "yes"}).status_code == 403


def test_view_permission_shows_but_never_changes(staff_client, rows):
    client = staff_client("budgets.view_gatewayuser", "budgets.view_budget")
    user = rows[GatewayUser]
    page = client.get(admin_url(user, "change"))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert client.post(admin_url(user, "change"), {"alias": "hacked"}).status_code == 403
    listing = client.get(admin_url(GatewayUser, "changelist"))
    assert listing.context["action_form"] is None  # block/reset need "change"
    client.post(
        admin_url(GatewayUser, "changelist"),
        {"action": "block_users", "_selected_action": [user.pk]},
    )
    client.post(
        admin_url(GatewayUser, "changelist"),
        {"action": "reset_period_now", "_selected_action": [user.pk]},
    )
    user.refresh_from_db()
    assert (user.alias, user.blocked) == ("", False)
    assert client.get(admin_url(GatewayUser, "add")).status_code == 403


def test_key_actions_need_the_change_permission(staff_client, rows):
    key = rows[APIKey]
    viewer = staff_client("budgets.view_apikey")
    viewer.post(
        admin_url(APIKey, "changelist"),
        {"action": "rotate_keys", "_selected_action": [str(key.pk)]},
    )
    viewer.post(
        admin_url(APIKey, "changelist"),
        {"action": "revoke_keys", "_selected_action": [str(key.pk)]},
    )
    assert APIKey.objects.get(pk=key.pk).key_hash == key.key_hash
    assert APIKey.objects.get(pk=key.pk).is_active

    editor = staff_client("budgets.view_apikey", "budgets.change_apikey")
    editor.post(
        admin_url(APIKey, "changelist"),
        {"action": "revoke_keys", "_selected_action": [str(key.pk)]},
    )
    assert not APIKey.objects.get(pk=key.pk).is_active


def test_a_staff_member_with_add_permission_can_create_keys(staff_client, rows):
    client = staff_client("budgets.add_apikey", "budgets.view_apikey")
    response = client.post(
        admin_url(APIKey, "add"),
        {"user": "u1", "key_name": "new", "allowed_models": "null", "metadata": "{}"},
    )
    assert response.status_code == 200
    assert APIKey.objects.filter(key_name="new").exists()


def test_csrf_is_enforced(django_user_model, rows):
    admin = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)

    refused = client.post(admin_url(Budget, "add"), {"name": "x", "max_budget_usd": "1"})
    assert refused.status_code == 403
    assert Budget.objects.count() == 1
    refused = client.post(
        admin_url(GatewayUser, "changelist"),
        {"action": "reset_period_now", "_selected_action": ["u1"]},
    )
    assert refused.status_code == 403
    assert client.post(admin_url(Hold, "release_stale")).status_code == 403

    page = client.get(admin_url(Budget, "add"))
    token = page.cookies["csrftoken"].value
    accepted = client.post(
        admin_url(Budget, "add"),
        {"name": "x", "max_budget_usd": "1", "csrfmiddlewaretoken": token},
    )
    assert accepted.status_code == 302
    assert Budget.objects.count() == 2


def test_dashboard_shows_only_the_panels_a_user_may_see(staff_client, rows):
    nothing = staff_client("budgets.view_budget").get("/admin/")
    assert nothing.status_code == 200
    assert nothing.context["dashboard"] is None
    assert "Spend per day" not in nothing.content.decode()

    usage_only = staff_client("usage.view_usagelog").get("/admin/")
    dash = usage_only.context["dashboard"]
    assert dash.chart is not None
    assert (dash.top_users, dash.near_budget, dash.holds) == (None, None, None)
    html = usage_only.content.decode()
    assert "Top models by spend" in html
    assert "Top users by spend" not in html
    assert "Users near or over budget" not in html

    everything = staff_client(
        "usage.view_usagelog", "budgets.view_gatewayuser", "budgets.view_hold"
    ).get("/admin/")
    assert everything.context["dashboard"].holds.count == 1
