"""Scoped budgets (ceilings) over HTTP (issue 14, docs/API.md "Scoped budgets"): otari's
routes and shapes, exact money, windows that start like a user's, master key only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgets.models import (
    DEFAULT_ORGANIZATION_ID,
    DEFAULT_WORKSPACE_ID,
    Budget,
    Ceiling,
    CeilingResetLog,
)
from tests.factories import make_budget, make_key

MARCH_14 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


@pytest.fixture
def workspace(admin) -> str:
    response = admin.post("/v1/workspaces", json={"name": "research"})
    assert response.status_code == 201
    return response.json()["id"]


def create(admin, **body) -> dict:
    response = admin.post("/v1/scoped-budgets", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_workspace_ceiling_on_a_monthly_budget(admin, workspace, time_machine):
    time_machine.move_to(MARCH_14, tick=False)
    budget = make_budget(max_budget_usd=Decimal("500"), reset_alignment="calendar_month")
    response = admin.post(
        "/v1/scoped-budgets",
        json={
            "scope_type": "workspace",
            "scope_id": workspace.upper(),
            "budget_id": budget.pk,
            "name": "research monthly",
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "id": body["id"],
        "scope_type": "workspace",
        # Stored as canonical UUID text: what requests are matched on.
        "scope_id": workspace,
        "provider_key_id": None,
        "budget_id": budget.pk,
        "name": "research monthly",
        "max_budget": 500,
        "current_spend": 0,
        "reserved_spend": 0,
        "budget_duration_sec": None,
        "reset_alignment": "calendar_month",
        # Like a user's first window: from now to the next calendar boundary.
        "period_start": "2025-03-14T09:30:00+00:00",
        "period_end": "2025-04-01T00:00:00+00:00",
        "lifetime_spend": 0,
        "topup": 0,
        "topup_expires_at": None,
        "created_at": "2025-03-14T09:30:00+00:00",
        "updated_at": "2025-03-14T09:30:00+00:00",
    }
    ceiling = Ceiling.objects.get(pk=body["id"])
    assert (ceiling.scope_id, ceiling.provider, ceiling.budget_id) == (workspace, "", budget.pk)
    assert ceiling.budget_started_at == MARCH_14
    assert ceiling.next_budget_reset_at == datetime(2025, 4, 1, tzinfo=UTC)
    assert not CeilingResetLog.objects.exists()
    assert admin.get(f"/v1/scoped-budgets/{body['id']}").json() == body
    assert admin.get(f"/api/v1/scoped-budgets/{body['id']}").json() == body


def test_rolling_and_periodless_budgets(admin, time_machine):
    time_machine.move_to(MARCH_14, tick=False)
    rolling = make_budget(max_budget_usd=Decimal("20"), budget_duration_sec=86400)
    key, _ = make_key()
    body = create(admin, scope_type="api_token", scope_id=str(key.pk), budget_id=rolling.pk)
    assert (body["budget_duration_sec"], body["reset_alignment"]) == (86400, None)
    assert (body["period_start"], body["period_end"]) == (
        "2025-03-14T09:30:00+00:00",
        "2025-03-15T09:30:00+00:00",
    )
    uncapped = make_budget()
    org = create(
        admin,
        scope_type="organization",
        scope_id=str(DEFAULT_ORGANIZATION_ID),
        budget_id=uncapped.pk,
    )
    assert (org["max_budget"], org["period_end"], org["name"]) == (None, None, None)


def test_money_is_exact(admin, workspace):
    budget = make_budget(max_budget_usd=Decimal("12.3456789012"))
    response = admin.post(
        "/v1/scoped-budgets",
        json={"scope_type": "workspace", "scope_id": workspace, "budget_id": budget.pk},
    )
    assert '"max_budget":12.3456789012' in response.text.replace(" ", "")


def test_provider_narrowing(admin, workspace):
    budget = make_budget(max_budget_usd=Decimal("50"))
    scope = {"scope_type": "workspace", "scope_id": workspace, "budget_id": budget.pk}
    everywhere = create(admin, **scope)
    at_anthropic = create(admin, **scope, provider_key_id="anthropic")
    assert at_anthropic["provider_key_id"] == "anthropic"
    assert Ceiling.objects.get(pk=at_anthropic["id"]).provider == "anthropic"
    # One per scope and provider.
    for provider in (None, "anthropic"):
        duplicate = admin.post("/v1/scoped-budgets", json={**scope, "provider_key_id": provider})
        assert duplicate.status_code == 409
        existing = at_anthropic if provider else everywhere
        assert duplicate.json() == {
            "detail": f"A scoped budget ({existing['id']}) already caps this scope and provider"
        }
    unknown = admin.post("/v1/scoped-budgets", json={**scope, "provider_key_id": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["detail"].startswith(
        "The provider named by provider_key_id is not configured; configured providers: "
    )
    assert "anthropic" in unknown.json()["detail"]
    assert Ceiling.objects.count() == 2


def test_unknown_scope_or_budget_is_404_and_creates_nothing(admin, workspace):
    budget = make_budget()
    key, _ = make_key()
    cases = [
        (
            "workspace",
            str(uuid.uuid4()),
            budget.pk,
            "The workspace named by scope_id was not found",
        ),
        ("workspace", "not-a-uuid", budget.pk, "The workspace named by scope_id was not found"),
        (
            "organization",
            str(uuid.uuid4()),
            budget.pk,
            "The organization named by scope_id was not found",
        ),
        ("api_token", str(uuid.uuid4()), budget.pk, "The API key named by scope_id was not found"),
        ("api_token", "gw-secret", budget.pk, "The API key named by scope_id was not found"),
        ("workspace", workspace, "no-such-budget", "The budget named by budget_id was not found"),
    ]
    for scope_type, scope_id, budget_id, detail in cases:
        response = admin.post(
            "/v1/scoped-budgets",
            json={"scope_type": scope_type, "scope_id": scope_id, "budget_id": budget_id},
        )
        assert (response.status_code, response.json()) == (404, {"detail": detail}), scope_id
    assert not Ceiling.objects.exists()
    # The default workspace exists (provisioned on first use), and so does the key.
    create(admin, scope_type="workspace", scope_id=str(DEFAULT_WORKSPACE_ID), budget_id=budget.pk)
    create(admin, scope_type="api_token", scope_id=str(key.pk), budget_id=budget.pk)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scope_type": "team", "scope_id": "x", "budget_id": "b"}, "scope_type"),
        ({"scope_type": "workspace_member", "scope_id": "x", "budget_id": "b"}, "scope_type"),
        ({"scope_id": "x", "budget_id": "b"}, "scope_type"),
        ({"scope_type": "workspace", "budget_id": "b"}, "scope_id"),
        ({"scope_type": "workspace", "scope_id": "x"}, "budget_id"),
        ({"scope_type": "workspace", "scope_id": 5, "budget_id": "b"}, "scope_id"),
        ({"scope_type": "workspace", "scope_id": "x", "budget_id": "b", "name": 1}, "name"),
        (
            {"scope_type": "workspace", "scope_id": "x", "budget_id": "b", "provider_key_id": 1},
            "provider_key_id",
        ),
    ],
)
def test_malformed_bodies_are_422_naming_the_field(admin, body, field):
    response = admin.post("/v1/scoped-budgets", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}:")


def test_list_and_filters(admin, workspace):
    budget = make_budget()
    key, _ = make_key()
    on_workspace = create(admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk)
    on_key = create(admin, scope_type="api_token", scope_id=str(key.pk), budget_id=budget.pk)
    on_org = create(
        admin, scope_type="organization", scope_id=str(DEFAULT_ORGANIZATION_ID), budget_id=budget.pk
    )

    def ids(**params) -> list[str]:
        response = admin.get("/v1/scoped-budgets", params=params)
        assert response.status_code == 200
        return [c["id"] for c in response.json()]

    assert ids() == [on_workspace["id"], on_key["id"], on_org["id"]]
    assert admin.get("/v1/scoped-budgets").json()[0] == on_workspace
    assert ids(scope_type="api_token") == [on_key["id"]]
    assert ids(scope_id=workspace.upper()) == [on_workspace["id"]]
    assert ids(scope_type="organization", scope_id=workspace) == []
    assert ids(scope_id="junk") == []
    assert ids(skip=1, limit=1) == [on_key["id"]]
    assert admin.get("/v1/scoped-budgets", params={"scope_type": "team"}).status_code == 422
    assert admin.get("/v1/scoped-budgets", params={"limit": 5000}).status_code == 422


def test_patch_name_and_unknowns(admin, workspace):
    budget = make_budget()
    ceiling = create(
        admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk, name="a"
    )
    url = f"/v1/scoped-budgets/{ceiling['id']}"
    renamed = admin.patch(url, json={"name": "research cap"})
    assert renamed.status_code == 200
    assert (renamed.json()["name"], renamed.json()["budget_id"]) == ("research cap", budget.pk)
    assert admin.patch(url, json={}).json()["name"] == "research cap"
    assert admin.patch(url, json={"budget_id": None}).json()["budget_id"] == budget.pk
    cleared = admin.patch(url, json={"name": None})
    assert cleared.json()["name"] is None
    assert Ceiling.objects.get(pk=ceiling["id"]).name == ""
    unknown_budget = admin.patch(url, json={"budget_id": "nope"})
    assert unknown_budget.status_code == 404
    assert Ceiling.objects.get(pk=ceiling["id"]).budget_id == budget.pk
    assert admin.patch(url, json={"name": 5}).status_code == 422
    for ceiling_id in (str(uuid.uuid4()), "junk"):
        for method in ("GET", "PATCH", "DELETE"):
            response = admin.request(method, f"/v1/scoped-budgets/{ceiling_id}", json={})
            assert response.status_code == 404
            assert response.json() == {"detail": f"Scoped budget '{ceiling_id}' not found"}


def test_a_new_budget_starts_a_fresh_window_and_keeps_the_old_spend(admin, workspace, time_machine):
    time_machine.move_to(MARCH_14, tick=False)
    monthly = make_budget(max_budget_usd=Decimal("500"), reset_alignment="calendar_month")
    ceiling = create(admin, scope_type="workspace", scope_id=workspace, budget_id=monthly.pk)
    # What settled requests would have left (the money statements are not this test's).
    Ceiling.objects.filter(pk=ceiling["id"]).update(spend_usd=Decimal("12.345678"))

    later = datetime(2025, 3, 20, 15, tzinfo=UTC)
    time_machine.move_to(later, tick=False)
    daily = make_budget(max_budget_usd=Decimal("30"), reset_alignment="calendar_day")
    moved = admin.patch(f"/v1/scoped-budgets/{ceiling['id']}", json={"budget_id": daily.pk})
    assert moved.status_code == 200
    body = moved.json()
    assert (body["budget_id"], body["max_budget"], body["reset_alignment"]) == (
        daily.pk,
        30,
        "calendar_day",
    )
    assert body["current_spend"] == 0
    assert (body["period_start"], body["period_end"]) == (
        "2025-03-20T15:00:00+00:00",
        "2025-03-21T00:00:00+00:00",
    )
    log = CeilingResetLog.objects.get(ceiling_id=ceiling["id"])
    assert (log.budget_id, log.previous_spend_usd) == (daily.pk, Decimal("12.345678"))
    assert (log.reset_at, log.next_reset_at) == (later, datetime(2025, 3, 21, tzinfo=UTC))
    # The same budget again is no move: no new window, no log.
    time_machine.move_to(later + timedelta(hours=1), tick=False)
    admin.patch(f"/v1/scoped-budgets/{ceiling['id']}", json={"budget_id": daily.pk})
    assert CeilingResetLog.objects.filter(ceiling_id=ceiling["id"]).count() == 1


def test_delete(admin, workspace):
    budget = make_budget()
    ceiling = create(admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk)
    response = admin.delete(f"/v1/scoped-budgets/{ceiling['id']}")
    assert (response.status_code, response.content) == (204, b"")
    assert not Ceiling.objects.exists()
    assert admin.get(f"/v1/scoped-budgets/{ceiling['id']}").status_code == 404
    assert admin.delete(f"/v1/scoped-budgets/{ceiling['id']}").status_code == 404
    # The scope is free again.
    create(admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk)


def test_topup(admin, workspace, time_machine):
    time_machine.move_to(MARCH_14, tick=True)
    budget = make_budget(max_budget_usd=Decimal("10"))
    ceiling = create(admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk)
    url = f"/v1/scoped-budgets/{ceiling['id']}/topup"
    expires = "2025-03-31T00:00:00+00:00"
    raised = admin.post(url, json={"amount": 2.500001, "expires_at": expires})
    assert raised.status_code == 200
    assert (raised.json()["topup"], raised.json()["topup_expires_at"]) == (2.500001, expires)
    stored = Ceiling.objects.get(pk=ceiling["id"])
    assert (stored.topup_usd, stored.topup_expires_at) == (
        Decimal("2.500001"),
        datetime(2025, 3, 31, tzinfo=UTC),
    )
    for body, message in [
        ({"amount": 5}, "expires_at: Required with a positive amount."),
        ({"amount": 5, "expires_at": "2025-03-01T00:00:00Z"}, "expires_at: Must be in the future."),
        ({"amount": -1, "expires_at": expires}, "amount: Must be between 0 and 999999999999."),
    ]:
        refused = admin.post(url, json=body)
        assert (refused.status_code, refused.json()) == (422, {"detail": message})
    assert Ceiling.objects.get(pk=ceiling["id"]).topup_usd == Decimal("2.500001")
    removed = admin.post(url, json={"amount": 0})
    assert (removed.json()["topup"], removed.json()["topup_expires_at"]) == (0, None)
    unknown = admin.post(f"/v1/scoped-budgets/{uuid.uuid4()}/topup", json={"amount": 0})
    assert unknown.status_code == 404


def test_a_budget_a_ceiling_uses_is_not_deleted(admin, workspace):
    budget = make_budget()
    ceiling = create(
        admin, scope_type="workspace", scope_id=workspace, budget_id=budget.pk, name="research"
    )
    refused = admin.delete(f"/v1/budgets/{budget.pk}")
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": f"The budget is used by scoped budget(s) {ceiling['id']} (research); point "
        "them at another budget or delete them first"
    }
    assert Budget.objects.filter(pk=budget.pk).exists()
    assert admin.delete(f"/v1/scoped-budgets/{ceiling['id']}").status_code == 204
    assert admin.delete(f"/v1/budgets/{budget.pk}").status_code == 204


def test_the_master_key_is_required(gateway, admin):
    _, secret = make_key()
    with gateway.client() as anonymous:
        assert anonymous.get("/v1/scoped-budgets").status_code == 401
        assert anonymous.get("/v1/workspaces").status_code == 401
    with gateway.client(secret) as with_api_key:
        assert with_api_key.post("/v1/workspaces", json={"name": "x"}).status_code == 403
        assert with_api_key.get("/v1/scoped-budgets").status_code == 403


def test_the_schema_describes_the_new_routes(gateway):
    with gateway.client() as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/workspaces",
        "/v1/workspaces/{workspace_id}",
        "/v1/scoped-budgets",
        "/v1/scoped-budgets/{ceiling_id}",
        "/v1/scoped-budgets/{ceiling_id}/topup",
    ):
        assert path in paths, path
    assert "201" in paths["/v1/workspaces"]["post"]["responses"]
    assert "204" in paths["/v1/scoped-budgets/{ceiling_id}"]["delete"]["responses"]
    ceiling = schema["components"]["schemas"]["CeilingResponse"]
    for field in ("max_budget", "current_spend", "reserved_spend", "period_end"):
        assert field in ceiling["required"]
    assert ceiling["properties"]["current_spend"]["type"] == "number"
    key = schema["components"]["schemas"]["KeyInfo"]
    assert key["properties"]["workspace_id"]["format"] == "uuid"
