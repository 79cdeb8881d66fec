"""Workspaces over HTTP, and the workspace of API keys (issue 14, docs/API.md
"Workspaces"): otari's routes and shapes, under /v1 and /api/v1, master key only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from django.utils import timezone

from budgets.models import DEFAULT_ORGANIZATION_ID, DEFAULT_WORKSPACE_ID, APIKey, Workspace
from tests.factories import make_budget, make_key, make_user
from usage.models import UsageLog

DEFAULT = str(DEFAULT_WORKSPACE_ID)


def create_workspace(admin, name: str, **body) -> dict:
    response = admin.post("/v1/workspaces", json={"name": name, **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_workspace_crud(admin, time_machine):
    time_machine.move_to(datetime(2025, 3, 14, 9, 30, tzinfo=UTC), tick=False)
    created = admin.post("/v1/workspaces", json={"name": "research", "description": "ML team"})
    assert created.status_code == 201
    body = created.json()
    assert body == {
        "id": body["id"],
        "name": "research",
        "description": "ML team",
        "organization_id": str(DEFAULT_ORGANIZATION_ID),
        "created_at": "2025-03-14T09:30:00+00:00",
        "updated_at": "2025-03-14T09:30:00+00:00",
    }
    assert Workspace.objects.get(pk=body["id"]).name == "research"
    assert admin.get(f"/v1/workspaces/{body['id']}").json() == body
    # Ids are read in any case, as UUIDs.
    assert admin.get(f"/v1/workspaces/{body['id'].upper()}").json() == body

    time_machine.move_to(datetime(2025, 3, 15, tzinfo=UTC), tick=False)
    renamed = admin.patch(f"/v1/workspaces/{body['id']}", json={"name": "research-eu"})
    assert renamed.status_code == 200
    assert renamed.json() == {
        **body,
        "name": "research-eu",
        "updated_at": "2025-03-15T00:00:00+00:00",
    }
    cleared = admin.patch(f"/v1/workspaces/{body['id']}", json={"description": None})
    assert (cleared.json()["name"], cleared.json()["description"]) == ("research-eu", "")

    deleted = admin.delete(f"/v1/workspaces/{body['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"message": "Workspace deleted"}
    assert not Workspace.objects.filter(pk=body["id"]).exists()
    assert admin.get(f"/v1/workspaces/{body['id']}").status_code == 404


def test_list_has_the_default_workspace_and_pages_with_a_count(admin):
    names = [create_workspace(admin, f"team-{n}")["name"] for n in range(3)]
    listed = admin.get("/v1/workspaces")
    assert listed.status_code == 200
    assert listed.json()["count"] == 4
    assert [w["name"] for w in listed.json()["data"]] == ["Default", *names]
    assert listed.json()["data"][0]["id"] == DEFAULT
    page = admin.get("/v1/workspaces", params={"skip": 1, "limit": 2}).json()
    assert ([w["name"] for w in page["data"]], page["count"]) == (names[:2], 4)
    assert admin.get("/v1/workspaces", params={"limit": 0}).status_code == 422
    # The same routes under /api/v1.
    assert admin.get("/api/v1/workspaces").json() == listed.json()


def test_duplicate_names_are_409(admin):
    first = create_workspace(admin, "research")
    other = create_workspace(admin, "support")
    duplicate = admin.post("/v1/workspaces", json={"name": "research"})
    assert duplicate.status_code == 409
    assert duplicate.json() == {"detail": "A workspace named 'research' already exists"}
    assert admin.post("/v1/workspaces", json={"name": "Default"}).status_code == 409
    clash = admin.patch(f"/v1/workspaces/{other['id']}", json={"name": "research"})
    assert clash.status_code == 409
    assert Workspace.objects.get(pk=other["id"]).name == "support"
    # Renaming to its own name is no clash.
    same = admin.patch(f"/v1/workspaces/{first['id']}", json={"name": "research"})
    assert same.status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": 5}, {"name": "x" * 256}, {"name": "ok", "description": 1}],
)
def test_invalid_bodies_are_422(admin, body):
    response = admin.post("/v1/workspaces", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].split(":")[0] in {"name", "description"}
    assert Workspace.objects.count() <= 1


@pytest.mark.parametrize("workspace_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_unknown_or_malformed_workspace_is_404(admin, workspace_id):
    for method in ("GET", "PATCH", "DELETE"):
        response = admin.request(method, f"/v1/workspaces/{workspace_id}", json={"name": "x"})
        assert response.status_code == 404
        assert response.json() == {"detail": f"Workspace '{workspace_id}' not found"}


def test_the_default_workspace_is_never_deleted(admin):
    response = admin.delete(f"/v1/workspaces/{DEFAULT}")
    assert response.status_code == 409
    assert response.json() == {"detail": "The default workspace cannot be deleted"}
    assert admin.get(f"/v1/workspaces/{DEFAULT}").json()["name"] == "Default"


def test_delete_is_refused_while_keys_are_in_it_revoked_ones_too(admin):
    workspace = create_workspace(admin, "research")
    key = admin.post("/v1/keys", json={"key_name": "ci", "workspace_id": workspace["id"]}).json()
    assert admin.delete(f"/v1/keys/{key['id']}").status_code == 204
    refused = admin.delete(f"/v1/workspaces/{workspace['id']}")
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        f"The workspace still has 1 API key(s) (revoked ones count: usage names them): {key['id']}"
    )
    assert Workspace.objects.filter(pk=workspace["id"]).exists()


def test_delete_is_refused_while_usage_rows_name_it(admin):
    workspace = create_workspace(admin, "research")
    UsageLog.objects.create(
        user=make_user(),
        workspace_id=workspace["id"],
        timestamp=timezone.now(),
        endpoint="chat",
        model="openai:gpt-4o-mini",
        status=UsageLog.Status.ERROR,
        counts_toward_budget=False,
    )
    refused = admin.delete(f"/v1/workspaces/{workspace['id']}")
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": "The workspace has usage rows; they keep it for the usage history"
    }


def test_delete_is_refused_while_a_ceiling_caps_it_naming_it(admin):
    workspace = create_workspace(admin, "research")
    budget = make_budget()
    ceiling = admin.post(
        "/v1/scoped-budgets",
        json={
            "scope_type": "workspace",
            "scope_id": workspace["id"],
            "budget_id": budget.pk,
            "name": "research cap",
        },
    ).json()
    refused = admin.delete(f"/v1/workspaces/{workspace['id']}")
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": f"The workspace is capped by scoped budget(s) {ceiling['id']} "
        "(research cap); delete them first"
    }
    assert admin.delete(f"/v1/scoped-budgets/{ceiling['id']}").status_code == 204
    assert admin.delete(f"/v1/workspaces/{workspace['id']}").status_code == 200


# --- the workspace of API keys ------------------------------------------------------------


def test_a_key_is_issued_into_a_workspace_and_reports_it(admin):
    workspace = create_workspace(admin, "research")
    created = admin.post("/v1/keys", json={"key_name": "ci", "workspace_id": workspace["id"]})
    assert created.status_code == 200
    key_id = created.json()["id"]
    assert created.json()["workspace_id"] == workspace["id"]
    assert str(APIKey.objects.get(pk=key_id).workspace_id) == workspace["id"]
    assert admin.get(f"/v1/keys/{key_id}").json()["workspace_id"] == workspace["id"]
    listed = {k["id"]: k["workspace_id"] for k in admin.get("/v1/keys").json()}
    assert listed[key_id] == workspace["id"]
    rotated = admin.post(f"/v1/keys/{key_id}/rotate")
    assert rotated.json()["workspace_id"] == workspace["id"]


def test_a_key_without_a_workspace_is_in_the_default_one(admin):
    created = admin.post("/v1/keys", json={"key_name": "plain"}).json()
    assert created["workspace_id"] == DEFAULT
    assert APIKey.objects.get(pk=created["id"]).workspace_id == DEFAULT_WORKSPACE_ID
    explicit_null = admin.post("/v1/keys", json={"workspace_id": None}).json()
    assert explicit_null["workspace_id"] == DEFAULT
    # A key issued before workspaces existed has none recorded: the default's.
    legacy, _ = make_key()
    APIKey.objects.filter(pk=legacy.pk).update(workspace=None)
    assert admin.get(f"/v1/keys/{legacy.pk}").json()["workspace_id"] == DEFAULT


@pytest.mark.parametrize("workspace_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_a_key_in_an_unknown_workspace_is_404_and_not_created(admin, workspace_id):
    user = make_user()
    response = admin.post("/v1/keys", json={"user_id": user.pk, "workspace_id": workspace_id})
    assert response.status_code == 404
    # Body input is not echoed.
    assert response.json() == {"detail": "The workspace named by workspace_id was not found"}
    assert not APIKey.objects.exists()


def test_keys_filter_by_workspace(admin):
    research = create_workspace(admin, "research")
    support = create_workspace(admin, "support")
    in_research = admin.post("/v1/keys", json={"workspace_id": research["id"]}).json()["id"]
    in_support = admin.post("/v1/keys", json={"workspace_id": support["id"]}).json()["id"]
    in_default = admin.post("/v1/keys", json={}).json()["id"]
    legacy, _ = make_key()
    APIKey.objects.filter(pk=legacy.pk).update(workspace=None)

    def ids(workspace_id: str) -> set[str]:
        response = admin.get("/v1/keys", params={"workspace_id": workspace_id})
        assert response.status_code == 200
        return {key["id"] for key in response.json()}

    assert ids(research["id"]) == {in_research}
    assert ids(support["id"].upper()) == {in_support}
    assert ids(DEFAULT) == {in_default, str(legacy.pk)}
    assert ids(str(uuid.uuid4())) == set()
    assert ids("not-a-uuid") == set()
    assert len(admin.get("/v1/keys").json()) == 4
    combined = admin.get(
        "/v1/keys", params={"workspace_id": DEFAULT, "user_id": legacy.user_id}
    ).json()
    assert [key["id"] for key in combined] == [str(legacy.pk)]


def test_a_keys_workspace_is_fixed(admin):
    research = create_workspace(admin, "research")
    support = create_workspace(admin, "support")
    key = admin.post("/v1/keys", json={"workspace_id": research["id"]}).json()
    moved = admin.patch(
        f"/v1/keys/{key['id']}", json={"key_name": "moved", "workspace_id": support["id"]}
    )
    assert moved.status_code == 422
    assert moved.json()["detail"].startswith("workspace_id: A key's workspace is fixed")
    stored = APIKey.objects.get(pk=key["id"])
    assert (str(stored.workspace_id), stored.key_name) == (research["id"], "")
    assert admin.patch(f"/v1/keys/{key['id']}", json={"workspace_id": "junk"}).status_code == 422
    # Its own workspace sent back (a KeyInfo round-tripped), or null, is no change.
    same = admin.patch(
        f"/v1/keys/{key['id']}", json={"key_name": "kept", "workspace_id": research["id"]}
    )
    assert (same.status_code, same.json()["workspace_id"]) == (200, research["id"])
    assert admin.patch(f"/v1/keys/{key['id']}", json={"workspace_id": None}).status_code == 200
    plain = admin.post("/v1/keys", json={}).json()
    assert admin.patch(f"/v1/keys/{plain['id']}", json={"workspace_id": DEFAULT}).status_code == 200
