"""The console's workspaces and ceilings (issue 14): their lists and pages with real
money on them, changes made through the forms landing as the services write them, the
service's refusal shown as it words it, the key's workspace, and spend per workspace on
the dashboard."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from budgets.models import (
    DEFAULT_WORKSPACE_ID,
    APIKey,
    Ceiling,
    CeilingResetLog,
    HoldCeiling,
    Workspace,
)
from budgets.services import ceilings, keys, periods, tenancy
from common.config import gateway_config
from tests.admin.conftest import admin_url, charge, open_hold
from tests.factories import make_budget, make_user

pytestmark = pytest.mark.django_db


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def research():
    """A workspace with two users' keys, a $50 monthly ceiling with $12.50 spent this
    period, one earlier period reset ($7.25), and an open $0.40 hold reserved on it."""
    monthly = make_budget(
        name="Team monthly", max_budget_usd=Decimal("50"), budget_duration_sec=30 * 86400
    )
    alice = make_user(user_id="alice", alias="Alice A")
    bob = make_user(user_id="bob")
    workspace = tenancy.workspace_create(name="Research", description="The research team")
    alice_key, _ = keys.api_key_create(user=alice, key_name="alice-laptop", workspace=workspace)
    bob_key, _ = keys.api_key_create(user=bob, key_name="bob-ci", workspace=workspace)
    cap = ceilings.ceiling_create(
        scope_type="workspace",
        scope_id=str(workspace.pk),
        budget_id=monthly.pk,
        name="Research cap",
    )
    # The money the gateway's hold and settle statements would have moved (budgets.services
    # .holds): a closed period, then this period's spend and one request in flight.
    Ceiling.objects.filter(pk=cap.pk).update(spend_usd=Decimal("7.25"))
    periods.ceiling_period_reset(ceiling_id=cap.pk)
    hold = open_hold(alice, "0.40")
    HoldCeiling.objects.create(hold=hold, ceiling=cap)
    Ceiling.objects.filter(pk=cap.pk).update(
        spend_usd=Decimal("12.50"), reserved_usd=F("reserved_usd") + Decimal("0.40")
    )
    cap.refresh_from_db()
    return {
        "workspace": workspace,
        "budget": monthly,
        "alice": alice,
        "bob": bob,
        "alice_key": alice_key,
        "bob_key": bob_key,
        "ceiling": cap,
        "hold": hold,
    }


# ---------------------------------------------------------------------------------------
# Pages


def test_workspace_list_shows_keys_spend_and_ceiling(admin_client, research):
    workspace = research["workspace"]
    charge(research["alice"], "1.25", workspace_id=workspace.pk)
    charge(research["bob"], "0.50", workspace_id=workspace.pk)
    charge(research["bob"], "9", workspace_id=DEFAULT_WORKSPACE_ID)
    keys.api_key_revoke(key_id=research["bob_key"].pk)

    response = admin_client.get(admin_url(Workspace, "changelist"))
    assert response.status_code == 200
    html = response.content.decode()
    rows = {w.name: w for w in response.context["cl"].result_list}
    assert set(rows) == {"Default", "Research"}
    assert rows["Research"].month == (Decimal("1.75"), 2)
    assert rows["Research"].key_counts == (2, 1)
    assert rows["Default"].month == (Decimal("9"), 1)
    for text in ("The research team", "1 active, 1 revoked", "$1.75", "$9.00", "26%"):
        assert text in html, text


def test_workspace_page_lists_keys_users_and_ceilings(admin_client, research):
    response = admin_client.get(admin_url(research["workspace"], "change"))
    assert response.status_code == 200
    html = response.content.decode()
    for text in (
        "alice-laptop",
        "Alice A",
        "bob-ci",
        "Research cap",
        "every provider",
        "$12.50",
        "$0.40",
        "$50.00",
        "Add a ceiling on it",
        f"scope=workspace%3A{research['workspace'].pk}",
    ):
        assert text in html, text


def test_ceiling_list_resolves_scopes_by_name(admin_client, research):
    org = ceilings.ceiling_create(
        scope_type="organization",
        scope_id=str(tenancy.organization_ensure().pk),
        budget_id=research["budget"].pk,
    )
    key_cap = ceilings.ceiling_create(
        scope_type="api_token",
        scope_id=str(research["bob_key"].pk),
        budget_id=research["budget"].pk,
    )
    response = admin_client.get(admin_url(Ceiling, "changelist"))
    assert response.status_code == 200
    html = response.content.decode()
    assert {c.pk: str(c.scope_html) for c in response.context["cl"].result_list}.keys() == {
        research["ceiling"].pk,
        org.pk,
        key_cap.pk,
    }
    for text in (
        "Research cap",
        "Organization ceiling",
        "the organization",
        "API key ceiling",
        "bob-ci",
        "Team monthly",
        "every provider",
        # Spend + reserved of the limit: (12.50 + 0.40) / 50.
        "26%",
    ):
        assert text in html, text
    assert ">Research</a>" in html


def test_ceiling_page_shows_bar_open_holds_and_resets(admin_client, research):
    cap = research["ceiling"]
    response = admin_client.get(admin_url(cap, "change"))
    assert response.status_code == 200
    html = response.content.decode()
    for text in (
        "Spend $12.50 + reserved $0.40 of $50.00",  # the bar's tooltip
        "$37.10",  # left
        str(research["hold"].request_id)[:8],
        "alice",
        "$7.25",  # the spend the earlier reset cleared
        "Every 30 days",
        "Reset period now",
        reversed_url(cap),
    ):
        assert text in html, text


def reversed_url(cap: Ceiling) -> str:
    return admin_url(Ceiling, "reset_period", cap.pk)


# ---------------------------------------------------------------------------------------
# Workspaces through the forms


def test_workspace_create_edit_and_duplicate_name(admin_client):
    response = admin_client.post(
        admin_url(Workspace, "add"), {"name": "Platform", "description": "Infra"}
    )
    assert response.status_code == 302
    created = Workspace.objects.get(name="Platform")
    assert (created.description, created.organization_id) == (
        "Infra",
        tenancy.organization_ensure().pk,
    )

    response = admin_client.post(
        admin_url(created, "change"), {"name": "Platform team", "description": "Infra"}
    )
    assert response.status_code == 302
    created.refresh_from_db()
    assert created.name == "Platform team"

    response = admin_client.post(admin_url(Workspace, "add"), {"name": "Platform team"})
    assert response.status_code == 200
    assert "A workspace named “Platform team” already exists." in response.content.decode()
    assert Workspace.objects.filter(name="Platform team").count() == 1


def test_workspace_delete_is_refused_with_the_services_message(admin_client, research):
    workspace = research["workspace"]
    response = admin_client.post(admin_url(workspace, "delete"), {"post": "yes"})
    assert response.status_code == 302
    assert response["Location"] == admin_url(workspace, "change")
    [message] = _messages(response)
    assert message.startswith("The workspace still has 2 API key(s)")
    assert Workspace.objects.filter(pk=workspace.pk).exists()
    page = admin_client.get(response["Location"])
    assert "The workspace still has 2 API key(s)" in page.content.decode()

    default = admin_client.post(
        admin_url(Workspace, "delete", DEFAULT_WORKSPACE_ID), {"post": "yes"}
    )
    assert _messages(default) == ["The default workspace cannot be deleted"]


def test_an_unused_workspace_is_deleted(admin_client):
    empty = tenancy.workspace_create(name="Scratch")
    confirm = admin_client.get(admin_url(empty, "delete"))
    assert confirm.status_code == 200
    response = admin_client.post(admin_url(empty, "delete"), {"post": "yes"})
    assert response.status_code == 302
    assert not Workspace.objects.filter(pk=empty.pk).exists()


# ---------------------------------------------------------------------------------------
# Ceilings through the forms


def test_ceiling_create_from_the_scope_select(admin_client, research):
    workspace = research["workspace"]
    add = admin_client.get(admin_url(Ceiling, "add"), {"scope": f"workspace:{workspace.pk}"})
    assert add.status_code == 200
    html = add.content.decode()
    for choice in (
        "The organization",
        f'value="workspace:{workspace.pk}" selected',
        "alice-laptop",
    ):
        assert choice in html, choice

    key = research["alice_key"]
    response = admin_client.post(
        admin_url(Ceiling, "add"),
        {
            "scope": f"api_token:{key.pk}",
            "provider": "",
            "budget": research["budget"].pk,
            "name": "Alice's laptop",
            "topup_usd": "0",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    made = Ceiling.objects.get(scope_type="api_token", scope_id=str(key.pk))
    assert (made.name, made.provider, made.budget_id) == (
        "Alice's laptop",
        "",
        research["budget"].pk,
    )
    # A first window from now, as ceiling_create starts it.
    assert made.next_budget_reset_at - made.budget_started_at == timedelta(days=30)
    assert made.spend_usd == 0

    again = admin_client.post(
        admin_url(Ceiling, "add"),
        {
            "scope": f"workspace:{workspace.pk}",
            "provider": "",
            "budget": research["budget"].pk,
            "topup_usd": "0",
        },
    )
    assert again.status_code == 200
    assert "“Research cap” already caps this at every provider" in again.content.decode()
    assert Ceiling.objects.count() == 2


def test_ceiling_narrowed_to_a_configured_provider(admin_client, research, settings, tmp_path):
    config = tmp_path / "otari.yaml"
    config.write_text("providers:\n  anthropic-eu: {kind: anthropic, api_key: sk-x}\n")
    settings.OTARI_CONFIG = str(config)
    gateway_config.cache_clear()
    try:
        response = admin_client.post(
            admin_url(Ceiling, "add"),
            {
                "scope": f"workspace:{research['workspace'].pk}",
                "provider": "anthropic-eu",
                "budget": research["budget"].pk,
                "topup_usd": "0",
            },
        )
        unknown = admin_client.post(
            admin_url(Ceiling, "add"),
            {
                "scope": f"workspace:{research['workspace'].pk}",
                "provider": "nowhere",
                "budget": research["budget"].pk,
                "topup_usd": "0",
            },
        )
    finally:
        settings.OTARI_CONFIG = ""
        gateway_config.cache_clear()
    assert response.status_code == 302
    assert Ceiling.objects.filter(provider="anthropic-eu").count() == 1
    assert unknown.status_code == 200
    assert "Select a valid choice" in unknown.content.decode()


def test_ceiling_edit_moves_budget_and_tops_up(admin_client, research):
    cap = research["ceiling"]
    weekly = make_budget(
        name="Weekly", max_budget_usd=Decimal("20"), reset_alignment="calendar_week"
    )
    expires = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    response = admin_client.post(
        admin_url(cap, "change"),
        {
            "name": "Research (weekly)",
            "budget": weekly.pk,
            "topup_usd": "5.50",
            "topup_expires_at_0": expires.strftime("%Y-%m-%d"),
            "topup_expires_at_1": expires.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    cap.refresh_from_db()
    assert (cap.name, cap.budget_id) == ("Research (weekly)", weekly.pk)
    assert (cap.topup_usd, cap.topup_expires_at) == (Decimal("5.5"), expires)
    # Moving it to another budget started a fresh window; the old spend is in the log.
    assert cap.spend_usd == 0
    assert cap.reserved_usd == Decimal("0.40")
    latest = CeilingResetLog.objects.filter(ceiling=cap).order_by("-created_at").first()
    assert latest.previous_spend_usd == Decimal("12.50")

    page = admin_client.get(admin_url(cap, "change")).content.decode()
    assert "$25.50 *" in page  # the limit with the live top-up
    assert "+$5.50 until" in page

    missing_expiry = admin_client.post(
        admin_url(cap, "change"),
        {"name": cap.name, "budget": weekly.pk, "topup_usd": "9", "topup_expires_at_0": ""},
    )
    assert missing_expiry.status_code == 200
    assert "Give the top-up an expiry time." in missing_expiry.content.decode()


def test_reset_period_now_button(admin_client, research):
    cap = research["ceiling"]
    response = admin_client.post(admin_url(Ceiling, "reset_period", cap.pk))
    assert response.status_code == 302
    assert response["Location"] == admin_url(cap, "change")
    assert _messages(response) == [
        "Started a fresh period for “Research cap”; $12.50 of spend moved to the reset log."
    ]
    cap.refresh_from_db()
    assert (cap.spend_usd, cap.reserved_usd) == (Decimal("0"), Decimal("0.40"))
    assert CeilingResetLog.objects.filter(ceiling=cap).count() == 2
    assert admin_client.get(admin_url(Ceiling, "reset_period", cap.pk)).status_code == 302


def test_reset_period_action_on_the_list(admin_client, research):
    cap = research["ceiling"]
    response = admin_client.post(
        admin_url(Ceiling, "changelist"),
        {"action": "reset_period_now", "_selected_action": [str(cap.pk)]},
    )
    assert response.status_code == 302
    cap.refresh_from_db()
    assert cap.spend_usd == 0


def test_ceiling_delete_through_the_service(admin_client, research):
    cap = research["ceiling"]
    confirm = admin_client.get(admin_url(cap, "delete"))
    assert confirm.status_code == 200
    response = admin_client.post(admin_url(cap, "delete"), {"post": "yes"})
    assert response.status_code == 302
    assert not Ceiling.objects.filter(pk=cap.pk).exists()
    # Its links go with it; its resets stay (history).
    assert not HoldCeiling.objects.filter(hold=research["hold"]).exists()
    assert CeilingResetLog.objects.filter(ceiling_id=cap.pk).count() == 1


# ---------------------------------------------------------------------------------------
# Keys


def test_key_is_created_in_a_workspace_which_is_then_read_only(admin_client, research):
    workspace = research["workspace"]
    response = admin_client.post(
        admin_url(APIKey, "add"),
        {
            "user": "alice",
            "workspace": str(workspace.pk),
            "key_name": "notebook",
            "allowed_models": "null",
            "metadata": "{}",
        },
    )
    assert response.status_code == 200  # the one-time secret page
    key = APIKey.objects.get(key_name="notebook")
    assert key.workspace_id == workspace.pk

    page = admin_client.get(admin_url(key, "change"))
    html = page.content.decode()
    assert 'name="workspace"' not in html
    assert "Research" in html
    other = tenancy.workspace_create(name="Elsewhere")
    admin_client.post(
        admin_url(key, "change"),
        {
            "key_name": "notebook",
            "is_active": "on",
            "workspace": str(other.pk),
            "allowed_models": "null",
            "metadata": "{}",
        },
    )
    key.refresh_from_db()
    assert key.workspace_id == workspace.pk

    listing = admin_client.get(admin_url(APIKey, "changelist"), {"workspace": str(workspace.pk)})
    assert {k.key_name for k in listing.context["cl"].result_list} == {
        "alice-laptop",
        "bob-ci",
        "notebook",
    }


def test_key_without_a_workspace_reads_as_default(admin_client):
    user = make_user(user_id="old")
    key, _ = keys.api_key_create(user=user, key_name="legacy")
    APIKey.objects.filter(pk=key.pk).update(workspace=None)  # issued before workspaces
    html = admin_client.get(admin_url(key, "change")).content.decode()
    assert admin_url(Workspace, "change", DEFAULT_WORKSPACE_ID) in html
    listing = admin_client.get(
        admin_url(APIKey, "changelist"), {"workspace": str(DEFAULT_WORKSPACE_ID)}
    )
    assert [k.key_name for k in listing.context["cl"].result_list] == ["legacy"]


# ---------------------------------------------------------------------------------------
# The dashboard


NOW = datetime(2025, 4, 15, 15, 0, tzinfo=UTC)


def test_dashboard_shows_spend_per_workspace_this_month(admin_client, admin_user):
    with time_machine.travel(NOW, tick=False):
        alice = make_user(user_id="alice")
        research = tenancy.workspace_create(name="Research")
        ops = tenancy.workspace_create(name="Ops")
        charge(
            alice, "3.333333", at=datetime(2025, 4, 1, 0, 0, tzinfo=UTC), workspace_id=research.pk
        )
        charge(alice, "1.10", at=NOW - timedelta(hours=1), workspace_id=research.pk)
        charge(alice, "100", at=datetime(2025, 3, 31, 23, 59, tzinfo=UTC), workspace_id=research.pk)
        charge(alice, "0.42", at=NOW - timedelta(days=2), workspace_id=ops.pk)
        # Written before workspaces existed: counted in the default workspace.
        charge(alice, "2", at=NOW - timedelta(days=3))
        charge(alice, "7", at=NOW - timedelta(days=15), workspace_id=research.pk)  # 31 Mar
        admin_client.force_login(admin_user)
        response = admin_client.get("/admin/")
    assert response.status_code == 200
    rows = [
        (r.share.label, r.share.spend_usd, r.share.requests)
        for r in response.context["dashboard"].workspace_spend
    ]
    assert rows == [
        ("Research", Decimal("4.433333"), 2),
        ("Default", Decimal("2"), 1),
        ("Ops", Decimal("0.42"), 1),
    ]
    html = response.content.decode()
    assert "Spend per workspace, April 2025 (UTC)" in html
    for text in ("$4.43", "$2.00", "$0.42", admin_url(research, "change")):
        assert text in html, text


# ---------------------------------------------------------------------------------------
# Who may see them


def test_anonymous_and_unpermitted_staff_are_kept_out(client, staff_client, research):
    pages = [
        admin_url(Workspace, "changelist"),
        admin_url(research["workspace"], "change"),
        admin_url(Ceiling, "changelist"),
        admin_url(research["ceiling"], "change"),
        admin_url(Ceiling, "add"),
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url
    unpermitted = staff_client("budgets.view_budget")
    for url in pages:
        assert unpermitted.get(url).status_code == 403, url
    cap = research["ceiling"]
    viewer = staff_client("budgets.view_ceiling")
    assert viewer.get(admin_url(cap, "change")).status_code == 200
    assert reversed_url(cap) not in viewer.get(admin_url(cap, "change")).content.decode()
    assert viewer.post(admin_url(Ceiling, "reset_period", cap.pk)).status_code == 403
    cap.refresh_from_db()
    assert cap.spend_usd == Decimal("12.50")


def test_unknown_ceiling_reset_is_404(admin_client):
    assert admin_client.post(admin_url(Ceiling, "reset_period", uuid.uuid4())).status_code == 404


# ---------------------------------------------------------------------------------------
# Fixed cost per page


def _grow_workspaces(budget, start: int, count: int) -> None:
    """`count` more workspaces, each with a user's key, a request, a workspace ceiling
    and a key ceiling."""
    for i in range(start, start + count):
        user = make_user(user_id=f"grow-{i}")
        workspace = tenancy.workspace_create(name=f"team-{i}")
        key, _ = keys.api_key_create(user=user, key_name=f"k{i}", workspace=workspace)
        charge(user, "0.10", workspace_id=workspace.pk)
        for scope_type, scope_id in (("workspace", workspace.pk), ("api_token", key.pk)):
            ceilings.ceiling_create(
                scope_type=scope_type, scope_id=str(scope_id), budget_id=budget.pk
            )


@pytest.mark.parametrize("model", [Workspace, Ceiling])
def test_list_query_count_does_not_grow_with_rows(admin_client, model):
    budget = make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=86400)
    _grow_workspaces(budget, 0, 2)
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(admin_url(model, "changelist")).status_code == 200
    _grow_workspaces(budget, 2, 20)
    with CaptureQueriesContext(connection) as many:
        assert admin_client.get(admin_url(model, "changelist")).status_code == 200
    assert len(many) == len(few)
