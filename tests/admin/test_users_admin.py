"""Users in the console: money shown and filtered against the limit admission uses,
changes and actions through budgets.services, money fields never editable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.messages import get_messages
from django.utils import timezone

from budgets.models import APIKey, BudgetResetLog, GatewayUser, Hold
from tests.admin.conftest import admin_url, charge, open_hold
from tests.factories import make_budget, make_key, make_user
from usage.models import UsageLog

pytestmark = pytest.mark.django_db
NOW = datetime(2025, 6, 18, 9, 30, tzinfo=UTC)


def _form(user: GatewayUser, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "alias": user.alias,
        "budget": user.budget_id or "",
        "topup_usd": "0",
        "topup_expires_at_0": "",
        "topup_expires_at_1": "",
        "allowed_models": "null",
        "metadata": "{}",
    }
    if user.blocked:
        data["blocked"] = "on"
    data.update(overrides)
    return data


@pytest.fixture
def team():
    budget = make_budget(
        name="Team", max_budget_usd=Decimal("10"), reset_alignment="calendar_month"
    )
    users = {
        "low": make_user(budget=budget, user_id="low"),
        "near": make_user(budget=budget, user_id="near", alias="Nearly Full"),
        "over": make_user(budget=budget, user_id="over"),
        "free": make_user(budget=make_budget(max_budget_usd=None), user_id="free"),
    }
    charge(users["low"], "1")
    charge(users["near"], "7.9")
    open_hold(users["near"], "0.1")  # 7.9 + 0.1 = 80%
    charge(users["over"], "12.5")  # a reply that cost more than its hold
    charge(users["free"], "3")
    return budget, users


def test_changelist_shows_money_usage_and_state(admin_client, team):
    response = admin_client.get(admin_url(GatewayUser, "changelist"))

    html = response.content.decode()
    assert response.status_code == 200
    for text in ("$7.90", "$0.10", "$10.00", "$2.00", ">80%<", ">125%<", "uncapped", "active"):
        assert text in html, text
    assert "otari-usage--over" in html
    assert "otari-usage--near" in html


@pytest.mark.parametrize(
    ("usage", "expected"),
    [("near", {"near", "over"}), ("over", {"over"}), ("uncapped", {"free"})],
)
def test_usage_filter_uses_spend_plus_reserved_against_the_limit(
    admin_client, team, usage, expected
):
    response = admin_client.get(admin_url(GatewayUser, "changelist"), {"usage": usage})
    assert {u.user_id for u in response.context["cl"].result_list} == expected


def test_a_live_top_up_raises_the_limit_in_the_list(admin_client, team):
    _, _users = team
    from budgets.services import accounts

    accounts.user_topup_set(
        user_id="over", amount_usd=Decimal("5"), expires_at=timezone.now() + timedelta(days=1)
    )
    response = admin_client.get(admin_url(GatewayUser, "changelist"), {"usage": "over"})
    assert list(response.context["cl"].result_list) == []  # 12.5 of 15: below the limit


def test_search_by_alias_and_state_filter(admin_client, team):
    found = admin_client.get(admin_url(GatewayUser, "changelist"), {"q": "nearly"})
    assert [u.user_id for u in found.context["cl"].result_list] == ["near"]
    blocked = admin_client.get(admin_url(GatewayUser, "changelist"), {"state": "blocked"})
    assert list(blocked.context["cl"].result_list) == []


def test_adding_a_user_on_a_budget_starts_its_window(admin_client):
    budget = make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=7 * 86400)
    with time_machine.travel(NOW, tick=False):
        response = admin_client.post(
            admin_url(GatewayUser, "add"),
            {
                "user_id": "erin",
                "alias": "Erin",
                "budget": budget.pk,
                "topup_usd": "0",
                "allowed_models": '["openai:*"]',
                "metadata": '{"team": "ml"}',
            },
        )

    assert response.status_code == 302
    user = GatewayUser.objects.get(pk="erin")
    assert (user.budget_started_at, user.next_budget_reset_at) == (NOW, NOW + timedelta(days=7))
    assert user.allowed_models == ["openai:*"]
    assert user.metadata == {"team": "ml"}
    assert LogEntry.objects.get().action_flag == ADDITION


def test_duplicate_user_id_is_refused(admin_client):
    make_user(user_id="taken")
    response = admin_client.post(
        admin_url(GatewayUser, "add"),
        {"user_id": "taken", "topup_usd": "0", "allowed_models": "null", "metadata": "{}"},
    )
    assert response.status_code == 200
    assert "already exists" in str(response.context["adminform"].form.errors["user_id"])


def test_moving_a_user_to_another_budget_starts_a_fresh_window(admin_client, team):
    _, users = team
    other = make_budget(name="Other", max_budget_usd=Decimal("50"), budget_duration_sec=3600)
    near = users["near"]

    with time_machine.travel(NOW, tick=False):
        response = admin_client.post(admin_url(near, "change"), _form(near, budget=other.pk))

    assert response.status_code == 302
    near.refresh_from_db()
    assert near.budget_id == other.pk
    assert near.spend_usd == 0
    assert near.reserved_usd == Decimal("0.1")  # the open hold is untouched
    assert (near.budget_started_at, near.next_budget_reset_at) == (NOW, NOW + timedelta(hours=1))
    log = BudgetResetLog.objects.get(user=near, reset_at=NOW)
    assert log.previous_spend_usd == Decimal("7.9")
    assert "Budget" in LogEntry.objects.get(action_flag=CHANGE).get_change_message()


def test_money_fields_cannot_be_changed_by_a_crafted_post(admin_client, team):
    _, users = team
    near = users["near"]
    response = admin_client.post(
        admin_url(near, "change"),
        _form(
            near,
            alias="Renamed",
            spend_usd="0",
            reserved_usd="0",
            lifetime_spend_usd="0",
            budget_started_at="2000-01-01",
        ),
    )

    assert response.status_code == 302
    near.refresh_from_db()
    assert near.alias == "Renamed"
    assert (near.spend_usd, near.reserved_usd, near.lifetime_spend_usd) == (
        Decimal("7.9"),
        Decimal("0.1"),
        Decimal("7.9"),
    )


def test_change_page_shows_money_read_only_and_hides_key_hashes(admin_client, team):
    _, users = team
    key, _ = make_key(users["near"], key_name="laptop")
    response = admin_client.get(admin_url(users["near"], "change"))

    html = response.content.decode()
    form = response.context["adminform"].form
    assert not {"spend_usd", "reserved_usd", "lifetime_spend_usd"} & set(form.fields)
    assert "$7.90" in html
    assert "$0.10" in html
    assert ">80%<" in html
    assert key.key_prefix in html
    assert key.key_hash not in html
    assert "All requests of this user" in html


def test_top_up_is_set_through_the_service_and_raises_the_limit(admin_client, team):
    _, users = team
    over = users["over"]
    expires = (timezone.now() + timedelta(days=3)).replace(microsecond=0)

    response = admin_client.post(
        admin_url(over, "change"),
        _form(
            over,
            topup_usd="5.25",
            topup_expires_at_0=expires.strftime("%Y-%m-%d"),
            topup_expires_at_1=expires.strftime("%H:%M:%S"),
        ),
    )

    assert response.status_code == 302
    over.refresh_from_db()
    assert (over.topup_usd, over.topup_expires_at) == (Decimal("5.25"), expires)
    page = admin_client.get(admin_url(over, "change")).content.decode()
    assert "+$5.25 until" in page
    listing = admin_client.get(admin_url(GatewayUser, "changelist")).content.decode()
    assert "$15.25 *" in listing


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"topup_usd": "5"}, "topup_expires_at", "Give the top-up an expiry time."),
        (
            {"topup_usd": "5", "topup_expires_at_0": "2001-01-01", "topup_expires_at_1": "00:00"},
            "topup_expires_at",
            "The expiry must be in the future.",
        ),
        ({"topup_usd": "-5"}, "topup_usd", "Amounts cannot be negative."),
        (
            {"topup_usd": "0", "topup_expires_at_0": "2099-01-01", "topup_expires_at_1": "00:00"},
            "topup_usd",
            "Enter the top-up amount, or clear the expiry.",
        ),
    ],
)
def test_bad_top_ups_are_refused(admin_client, team, values, field, message):
    _, users = team
    response = admin_client.post(admin_url(users["low"], "change"), _form(users["low"], **values))
    assert response.status_code == 200
    assert message in response.context["adminform"].form.errors[field]
    users["low"].refresh_from_db()
    assert users["low"].topup_usd == 0


def test_clearing_the_top_up_removes_it(admin_client, team):
    _, _users = team
    from budgets.services import accounts

    accounts.user_topup_set(
        user_id="low", amount_usd=Decimal("2"), expires_at=timezone.now() + timedelta(days=1)
    )
    user = GatewayUser.objects.get(pk="low")
    admin_client.post(admin_url(user, "change"), _form(user, topup_usd="0"))
    user.refresh_from_db()
    assert (user.topup_usd, user.topup_expires_at) == (0, None)


def test_block_and_unblock_actions(admin_client, team):
    _, _users = team
    url = admin_url(GatewayUser, "changelist")
    admin_client.post(url, {"action": "block_users", "_selected_action": ["low", "near"]})
    assert set(GatewayUser.objects.filter(blocked=True).values_list("pk", flat=True)) == {
        "low",
        "near",
    }
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 2

    response = admin_client.post(
        url, {"action": "unblock_users", "_selected_action": ["low"]}, follow=True
    )
    assert not GatewayUser.objects.get(pk="low").blocked
    assert "Unblocked 1 user." in [m.message for m in get_messages(response.wsgi_request)]


def test_reset_period_now_zeroes_spend_keeps_reserved_and_logs(admin_client, team):
    _, _users = team
    # After the team's charges (a reset never starts a window before a charge it clears).
    later = timezone.now() + timedelta(days=1)
    with time_machine.travel(later, tick=False):
        response = admin_client.post(
            admin_url(GatewayUser, "changelist"),
            {"action": "reset_period_now", "_selected_action": ["near", "over"]},
            follow=True,
        )

    near, over = GatewayUser.objects.get(pk="near"), GatewayUser.objects.get(pk="over")
    assert (near.spend_usd, near.reserved_usd) == (0, Decimal("0.1"))
    assert over.spend_usd == 0
    assert near.budget_started_at == later
    next_month = datetime(later.year + later.month // 12, later.month % 12 + 1, 1, tzinfo=UTC)
    assert near.next_budget_reset_at == next_month
    logs = {log.user_id: log.previous_spend_usd for log in BudgetResetLog.objects.all()}
    assert logs == {"near": Decimal("7.9"), "over": Decimal("12.5")}
    assert near.lifetime_spend_usd == Decimal("7.9")  # history is not rewritten
    messages = [m.message for m in get_messages(response.wsgi_request)]
    assert messages == [
        "Started a fresh budget period for 2 users; $20.40 of spend moved to the reset log."
    ]
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 2


def test_delete_is_soft_keys_stop_and_history_stays(admin_client, team):
    _, users = team
    key, _ = make_key(users["low"])
    page = admin_client.get(admin_url(users["low"], "delete")).content.decode()
    assert "all their API keys stop working" in page

    response = admin_client.post(admin_url(users["low"], "delete"), {"post": "yes"})

    assert response.status_code == 302
    user = GatewayUser.objects.get(pk="low")
    assert user.deleted_at is not None
    assert not APIKey.objects.get(pk=key.pk).is_active
    assert UsageLog.objects.filter(user=user).count() == 1
    assert Hold.objects.filter(user=user).count() == 1
    listing = admin_client.get(admin_url(GatewayUser, "changelist"), {"state": "deleted"})
    assert [u.user_id for u in listing.context["cl"].result_list] == ["low"]


def test_bulk_delete_is_soft_too(admin_client, team):
    admin_client.post(
        admin_url(GatewayUser, "changelist"),
        {"action": "delete_selected", "_selected_action": ["low", "free"], "post": "yes"},
    )
    assert set(
        GatewayUser.objects.filter(deleted_at__isnull=False).values_list("pk", flat=True)
    ) == {"low", "free"}
    assert GatewayUser.objects.count() == 4
