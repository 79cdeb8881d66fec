"""Users, top-ups and API keys over HTTP, through the ASGI app (docs/SPEC.md §6, §1)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.models import APIKey, GatewayUser
from budgets.services.keys import secret_hash
from tests.conftest import MASTER_KEY
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

# --- users ---------------------------------------------------------------------------


def test_user_crud(admin):
    budget = make_budget(max_budget_usd=Decimal("3"), reset_alignment="calendar_day")
    created = admin.post(
        "/v1/users",
        json={
            "user_id": "alice@example.com",
            "alias": "Alice",
            "budget_id": budget.pk,
            "allowed_models": ["openai:*"],
            "metadata": {"team": "ml"},
        },
    )
    assert created.status_code == 200
    body = created.json()
    assert body["user_id"] == "alice@example.com"
    assert (body["spend"], body["reserved"], body["lifetime_spend"]) == (0, 0, 0)
    for counter in ("current_requests", "current_tokens", "reserved_requests", "reserved_tokens"):
        assert body[counter] == 0
    assert body["budget_started_at"] is not None
    assert body["next_budget_reset_at"].endswith("T00:00:00+00:00")
    assert body["allowed_models"] == ["openai:*"]
    assert admin.get("/v1/users/alice@example.com").json() == body

    updated = admin.patch(
        "/v1/users/alice@example.com", json={"blocked": True, "allowed_models": None}
    )
    assert updated.status_code == 200
    assert (updated.json()["blocked"], updated.json()["allowed_models"]) == (True, None)
    assert updated.json()["alias"] == "Alice"
    user = GatewayUser.objects.get(pk="alice@example.com")
    assert (user.blocked, user.allowed_models, user.metadata) == (True, None, {"team": "ml"})


def test_user_duplicates_and_unknowns(admin):
    make_user(user_id="bob")
    duplicate = admin.post("/v1/users", json={"user_id": "bob"})
    assert duplicate.status_code == 409
    assert "bob" in duplicate.json()["detail"]
    unknown_budget = admin.post("/v1/users", json={"user_id": "carol", "budget_id": "nope"})
    assert unknown_budget.status_code == 404
    assert not GatewayUser.objects.filter(pk="carol").exists()
    for method in ("get", "patch", "delete"):
        response = admin.request(method.upper(), "/v1/users/ghost", json={})
        assert response.status_code == 404
        assert response.json() == {"detail": "User 'ghost' not found"}


@pytest.mark.parametrize("user_id", ["", " padded", "a/b", "tab\there", "x" * 256, 12, None])
def test_user_id_validation(admin, user_id):
    response = admin.post("/v1/users", json={"user_id": user_id})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("user_id:")
    assert not GatewayUser.objects.exists()


def test_user_delete_is_soft(gateway, admin):
    set_price()
    user = make_user(user_id="dave")
    _, secret = make_key(user)
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    assert admin.delete("/v1/users/dave").status_code == 204
    # Keys stop working; usage stays readable; the user is gone from this API.
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 401
    assert not APIKey.objects.get(user=user).is_active
    assert admin.get("/v1/users/dave").status_code == 404
    assert admin.get("/v1/users").json() == []
    assert len(admin.get("/v1/users/dave/usage").json()) == 1
    assert len(admin.get("/v1/usage", params={"user_id": "dave"}).json()) == 1
    assert UsageLog.objects.filter(user=user).count() == 1
    again = admin.post("/v1/users", json={"user_id": "dave"})
    assert again.status_code == 409


def test_user_pagination(admin):
    ids = [make_user(user_id=f"u{i}").pk for i in range(4)]
    assert [u["user_id"] for u in admin.get("/v1/users?limit=3").json()] == ids[:3]
    assert [u["user_id"] for u in admin.get("/v1/users?skip=3").json()] == ids[3:]
    assert admin.get("/v1/users?limit=1001").status_code == 422


def test_user_counters_follow_usage(gateway, admin):
    set_price()
    _, secret = make_key(make_user(user_id="erin"))
    response = gateway.chat(secret, model="openai:gpt-4o-mini")
    assert response.status_code == 200
    body = admin.get("/v1/users/erin").json()
    row = UsageLog.objects.get()
    assert body["current_requests"] == 1
    assert body["current_tokens"] == row.total_tokens
    assert body["lifetime_spend"] == float(row.cost_usd)
    assert Decimal(str(body["spend"])) == row.cost_usd


def test_topup(gateway, admin):
    set_price()
    budget = make_budget(max_budget_usd=Decimal("0"))
    _, secret = make_key(make_user(budget=budget, user_id="fay"))
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 403
    expires = (timezone.now() + timedelta(hours=1)).isoformat()
    response = admin.post("/v1/users/fay/topup", json={"amount": 1.5, "expires_at": expires})
    assert response.status_code == 200
    assert response.json()["topup"] == 1.5
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    assert admin.post("/v1/users/fay/topup", json={"amount": 1}).status_code == 422
    past = (timezone.now() - timedelta(hours=1)).isoformat()
    assert (
        admin.post("/v1/users/fay/topup", json={"amount": 1, "expires_at": past}).status_code == 422
    )
    removed = admin.post("/v1/users/fay/topup", json={"amount": 0})
    assert (removed.json()["topup"], removed.json()["topup_expires_at"]) == (0, None)
    assert admin.post("/v1/users/ghost/topup", json={"amount": 0}).status_code == 404


# --- keys ----------------------------------------------------------------------------


def test_key_create_shows_the_secret_once(gateway, admin):
    set_price()
    make_user(user_id="gus")
    created = admin.post("/v1/keys", json={"user_id": "gus", "key_name": "ci"})
    assert created.status_code == 200
    body = created.json()
    secret = body["key"]
    assert secret.startswith("gw-")
    assert (body["key_prefix"], body["key_suffix"]) == (secret[:10], secret[-4:])
    assert body["workspace_id"] == "00000000-0000-4000-8000-000000000000"
    key = APIKey.objects.get(pk=body["id"])
    assert key.key_hash == secret_hash(secret)
    listed = admin.get("/v1/keys").json()
    fetched = admin.get(f"/v1/keys/{body['id']}").json()
    for shown in (listed[0], fetched):
        assert "key" not in shown
        assert secret not in str(shown)
    assert fetched["id"] == body["id"]
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200


def test_key_without_user_gets_its_own(admin):
    body = admin.post("/v1/keys", json={"key_name": "solo"}).json()
    user = GatewayUser.objects.get(pk=body["user_id"])
    assert user.user_id.startswith("apikey-")
    assert user.alias == "solo"


def test_key_update_rotate_delete(gateway, admin):
    set_price()
    _, secret = make_key(make_user(user_id="hal"))
    key = APIKey.objects.get()
    updated = admin.patch(
        f"/v1/keys/{key.pk}", json={"key_name": "renamed", "allowed_models": ["anthropic:*"]}
    )
    assert updated.status_code == 200
    assert (updated.json()["key_name"], updated.json()["allowed_models"]) == (
        "renamed",
        ["anthropic:*"],
    )
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 403
    assert admin.patch(f"/v1/keys/{key.pk}", json={"allowed_models": None}).status_code == 200

    rotated = admin.post(f"/v1/keys/{key.pk}/rotate")
    assert rotated.status_code == 200
    new_secret = rotated.json()["key"]
    assert rotated.json()["id"] == str(key.pk)
    assert new_secret != secret
    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 401
    assert gateway.chat(new_secret, model="openai:gpt-4o-mini").status_code == 200

    assert admin.delete(f"/v1/keys/{key.pk}").status_code == 204
    assert gateway.chat(new_secret, model="openai:gpt-4o-mini").status_code == 401
    assert admin.get(f"/v1/keys/{key.pk}").json()["is_active"] is False


def test_key_errors(admin):
    missing = "00000000-0000-0000-0000-000000000001"
    for method, path in (
        ("GET", f"/v1/keys/{missing}"),
        ("PATCH", f"/v1/keys/{missing}"),
        ("DELETE", f"/v1/keys/{missing}"),
        ("POST", f"/v1/keys/{missing}/rotate"),
        ("GET", "/v1/keys/not-a-uuid"),
    ):
        response = admin.request(method, path, json={})
        assert response.status_code == 404, path
        assert "not found" in response.json()["detail"]
    # A secret pasted in place of an id is not echoed back.
    pasted = admin.get("/v1/keys/gw-supersecretvalue")
    assert pasted.status_code == 404
    assert "supersecret" not in pasted.text
    assert admin.post("/v1/keys", json={"user_id": "ghost"}).status_code == 404
    assert admin.post("/v1/keys", json={"allowed_models": ["gpt-4o"]}).status_code == 422
    assert admin.post("/v1/keys", json={"exclude_from_budget": "yes"}).status_code == 422
    assert admin.post("/v1/keys", json={"capture_agent_telemetry": True}).status_code == 422
    assert not APIKey.objects.exists()


def test_key_pagination_newest_first(admin):
    user = make_user()
    ids = [str(make_key(user, key_name=f"k{i}")[0].pk) for i in range(3)]
    assert [k["id"] for k in admin.get("/v1/keys?limit=2").json()] == ids[::-1][:2]
    assert [k["id"] for k in admin.get("/v1/keys?skip=2").json()] == ids[:1]
    assert admin.get("/v1/keys?skip=-1").status_code == 422


# --- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {MASTER_KEY}"},
        {"Otari-Key": MASTER_KEY},
        {"Otari-Key": f"Bearer {MASTER_KEY}"},
        {"x-api-key": MASTER_KEY},
    ],
)
def test_master_key_in_every_accepted_header(gateway, settings, headers):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    with gateway.client() as client:
        assert client.get("/api/v1/users", headers=headers).status_code == 200


def test_management_refuses_anything_but_the_master_key(gateway, settings):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    _, secret = make_key(make_user())
    with gateway.client() as client:
        missing = client.get("/v1/users")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.get("/v1/users", headers={"Authorization": "Bearer otari-mk-wrong"})
        assert wrong.status_code == 401
        assert "otari-mk-wrong" not in wrong.text
        api_key = client.post("/v1/budgets", json={}, headers={"Authorization": f"Bearer {secret}"})
        assert api_key.status_code == 403
        assert secret not in api_key.text
    assert not GatewayUser.objects.exclude(api_keys__isnull=False).exists()
