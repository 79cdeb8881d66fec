"""The history of every money setting: who changed it, when, through what (console, API,
command), old -> new; on each object's page and in one searchable list; read-only for
everyone; and never written by the request path."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.models import APIKey, Budget, GatewayUser, SettingChange
from tests.admin.conftest import admin_url
from tests.conftest import REPO, database_url
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog


def _changes(object_type: str, object_id: str) -> list[SettingChange]:
    return list(
        SettingChange.objects.filter(object_type=object_type, object_id=object_id).order_by(
            "changed_at", "id"
        )
    )


@pytest.mark.django_db
def test_a_limit_changed_in_the_console_is_recorded_with_who_and_old_to_new(
    admin_client, admin_user
):
    budget = make_budget(name="Research", max_budget_usd=Decimal("10"))
    response = admin_client.post(
        admin_url(budget, "change"),
        {
            "name": "Research",
            "max_budget_usd": "25",
            "budget_duration_sec": "",
            "reset_alignment": "",
            "alert_thresholds_pct": "80, 100",
            "alert_webhook_url": "",
            "alert_emails": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    created, changed = _changes("budget", budget.pk)
    assert (created.kind, created.channel) == ("+", "system")
    assert ["max_budget_usd", None, "10"] in created.changes
    assert (changed.kind, changed.channel, changed.actor) == ("~", "console", admin_user.username)
    assert changed.changes == [["max_budget_usd", "10", "25"]]

    # On the budget's own page, and in the one list of every change.
    page = admin_client.get(admin_url(budget, "change")).content.decode()
    assert "Changes to settings" in page
    assert "<s>$10.00</s> → <b>$25.00</b>" in page
    listing = admin_client.get(admin_url(SettingChange, "changelist"), {"q": "Research"})
    assert "<s>$10.00</s> → <b>$25.00</b>" in listing.content.decode()


def test_api_changes_are_recorded_as_the_management_api_with_the_master_key(gateway, admin):
    user = make_user(user_id="fay", alias="Fay")
    expires = (timezone.now() + timedelta(hours=1)).isoformat()
    assert admin.patch("/v1/users/fay", json={"tpm_limit": 5000}).status_code == 200
    topup = admin.post("/v1/users/fay/topup", json={"amount": 1.5, "expires_at": expires})
    assert topup.status_code == 200
    _, rate, topped = _changes("user", user.pk)
    assert (rate.channel, rate.actor) == ("api", "master key")
    assert rate.changes == [["tpm_limit", None, 5000]]
    assert (topped.channel, topped.actor) == ("api", "master key")
    assert ["topup_usd", "0", "1.5"] in topped.changes


@pytest.mark.postgres  # the command runs in its own process, on the test database
def test_a_command_is_recorded_as_the_command(transactional_db):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="cmd-user")
    until = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    # The real manage.py, in its own process, on the test database.
    result = subprocess.run(
        [sys.executable, "manage.py", "topup_user", "cmd-user", "2.50", "--until", until],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": database_url()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    last = _changes("user", user.pk)[-1]
    assert last.channel == "command"
    assert last.actor.startswith("manage.py topup_user (")
    assert ["topup_usd", "0", "2.5"] in last.changes


@pytest.mark.django_db
def test_keys_prices_and_soft_deletes_are_recorded(admin_client):
    user = make_user(user_id="ana")
    key, _ = make_key(user, key_name="laptop", rpm_limit=60)
    from budgets.services import accounts, keys

    keys.api_key_update(key_id=key.pk, rpm_limit=120)
    accounts.user_delete(user_id="ana")
    set_price("openai:gpt-4o", "2.5", "10")
    ids = [str(key.pk), key.pk.hex]
    key_changes = list(
        SettingChange.objects.filter(object_type="key", object_id__in=ids).order_by("changed_at")
    )
    assert [c.kind for c in key_changes] == ["+", "~", "~"]
    assert key_changes[1].changes == [["rpm_limit", 60, 120]]
    assert key_changes[2].changes == [["is_active", True, False]]
    assert _changes("user", "ana")[-1].changes[0][:2] == ["deleted_at", None]
    price = _changes("price", "openai:gpt-4o")[0]
    assert ["input_price_per_mtok_usd", None, "2.5"] in price.changes
    # The key's hash is never in its history.
    assert not any(c[0] == "key_hash" for ch in key_changes for c in ch.changes)


@pytest.mark.django_db
def test_nobody_can_edit_or_delete_the_history(admin_client):
    make_budget(name="Ops")
    change = SettingChange.objects.get()
    assert admin_client.get(admin_url(SettingChange, "changelist")).status_code == 200
    assert admin_client.get(admin_url(SettingChange, "add")).status_code == 403
    assert admin_client.post(admin_url(change, "delete"), {"post": "yes"}).status_code == 403
    assert admin_client.post(admin_url(change, "change"), {"actor": "x"}).status_code == 403
    assert SettingChange.objects.get().actor == change.actor


def test_requests_write_no_history(gateway):
    """Spend and reserved change on every request; only setting changes are versioned."""
    set_price()
    budget = make_budget(max_budget_usd=Decimal("10"))
    user = make_user(budget=budget, user_id="busy")
    _, secret = make_key(user)
    before = SettingChange.objects.count()
    for _ in range(3):
        assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    user.refresh_from_db()
    assert user.spend_usd > 0
    assert UsageLog.objects.filter(user=user).count() == 3
    assert SettingChange.objects.count() == before
    assert GatewayUser.history.count() == 1
    assert APIKey.history.count() == 1
    assert Budget.history.count() == 1
