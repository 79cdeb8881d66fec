"""Rate limits configured through the management API (issue 8, item 3): users and keys
carry `rpm_limit` / `tpm_limit` on create, update, get and list; bad values are 422s that
never repeat the value; and a limit set over HTTP is the one the gateway enforces."""

from __future__ import annotations

import pytest

from budgets.exceptions import InvalidRateLimit
from budgets.models import APIKey, GatewayUser
from budgets.services import accounts, keys
from tests.factories import make_key, make_user, set_price
from usage.models import UsageLog


def test_user_limits_on_create_get_list_update_and_clear(admin):
    created = admin.post(
        "/v1/users", json={"user_id": "rita", "rpm_limit": 60, "tpm_limit": 100_000}
    )
    assert created.status_code == 200
    assert (created.json()["rpm_limit"], created.json()["tpm_limit"]) == (60, 100_000)
    user = GatewayUser.objects.get(pk="rita")
    assert (user.rpm_limit, user.tpm_limit) == (60, 100_000)
    assert admin.get("/v1/users/rita").json() == created.json()
    [listed] = admin.get("/v1/users").json()
    assert (listed["rpm_limit"], listed["tpm_limit"]) == (60, 100_000)

    # Only what is sent changes; null removes a limit.
    updated = admin.patch("/v1/users/rita", json={"rpm_limit": 5})
    assert (updated.json()["rpm_limit"], updated.json()["tpm_limit"]) == (5, 100_000)
    cleared = admin.patch("/v1/users/rita", json={"tpm_limit": None, "alias": "Rita"})
    assert (cleared.json()["rpm_limit"], cleared.json()["tpm_limit"]) == (5, None)
    user.refresh_from_db()
    assert (user.rpm_limit, user.tpm_limit, user.alias) == (5, None, "Rita")

    # Without limits: null, the default.
    plain = admin.post("/v1/users", json={"user_id": "sam"}).json()
    assert (plain["rpm_limit"], plain["tpm_limit"]) == (None, None)


def test_key_limits_on_create_get_list_update_and_clear(admin):
    make_user(user_id="tess", rpm_limit=100)
    created = admin.post("/v1/keys", json={"user_id": "tess", "rpm_limit": 2, "tpm_limit": 500})
    assert created.status_code == 200
    body = created.json()
    assert (body["rpm_limit"], body["tpm_limit"]) == (2, 500)
    key = APIKey.objects.get(pk=body["id"])
    assert (key.rpm_limit, key.tpm_limit) == (2, 500)
    # The key's limits are its own: the user's stay as they were.
    assert GatewayUser.objects.get(pk="tess").rpm_limit == 100

    fetched = admin.get(f"/v1/keys/{key.pk}").json()
    [listed] = admin.get("/v1/keys", params={"user_id": "tess"}).json()
    for shown in (fetched, listed):
        assert (shown["rpm_limit"], shown["tpm_limit"]) == (2, 500)

    updated = admin.patch(f"/v1/keys/{key.pk}", json={"tpm_limit": 9000})
    assert (updated.json()["rpm_limit"], updated.json()["tpm_limit"]) == (2, 9000)
    cleared = admin.patch(f"/v1/keys/{key.pk}", json={"rpm_limit": None})
    assert (cleared.json()["rpm_limit"], cleared.json()["tpm_limit"]) == (None, 9000)
    key.refresh_from_db()
    assert (key.rpm_limit, key.tpm_limit) == (None, 9000)

    # A key created without a user: the limits are the key's, its new user has none.
    solo = admin.post("/v1/keys", json={"key_name": "solo", "rpm_limit": 7}).json()
    assert solo["rpm_limit"] == 7
    assert GatewayUser.objects.get(pk=solo["user_id"]).rpm_limit is None


# Values chosen so that an echo would be visible in the message (which names the range).
BAD_LIMITS = [
    pytest.param("rpm_limit", 0, id="zero"),
    pytest.param("rpm_limit", -987654, id="negative"),
    pytest.param("tpm_limit", 2.5, id="fraction"),
    pytest.param("tpm_limit", 3.0, id="float"),
    pytest.param("rpm_limit", "777", id="string"),
    pytest.param("tpm_limit", True, id="boolean"),
    pytest.param("rpm_limit", [5], id="list"),
    pytest.param("rpm_limit", 1_000_000_001, id="rpm-too-large"),
    pytest.param("tpm_limit", 1_000_000_000_007, id="tpm-too-large"),
    pytest.param("tpm_limit", 10**30 + 3, id="beyond-int64"),
]


def _assert_refused(response, field: str, value: object) -> None:
    assert response.status_code == 422
    detail = response.json()["detail"]
    maximum = 1_000_000_000 if field == "rpm_limit" else 1_000_000_000_000
    assert detail == f"{field}: Must be an integer from 1 to {maximum}, or null for no limit."
    if value not in (0, True):
        assert str(value) not in detail
        assert repr(value) not in detail


@pytest.mark.parametrize(("field", "value"), BAD_LIMITS)
def test_bad_limits_are_refused_without_echo(admin, field, value):
    make_user(user_id="uma", rpm_limit=10)
    key, _ = make_key(GatewayUser.objects.get(pk="uma"), tpm_limit=1000)

    for response in (
        admin.post("/v1/users", json={"user_id": "victor", field: value}),
        admin.patch("/v1/users/uma", json={field: value}),
        admin.post("/v1/keys", json={"user_id": "uma", field: value}),
        admin.post("/v1/keys", json={field: value}),
        admin.patch(f"/v1/keys/{key.pk}", json={field: value}),
    ):
        _assert_refused(response, field, value)

    # Nothing was written.
    assert not GatewayUser.objects.filter(pk="victor").exists()
    assert list(GatewayUser.objects.values_list("pk", flat=True)) == ["uma"]
    assert APIKey.objects.count() == 1
    key.refresh_from_db()
    assert (key.rpm_limit, key.tpm_limit) == (None, 1000)
    assert GatewayUser.objects.get(pk="uma").rpm_limit == 10


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value"), BAD_LIMITS)
def test_the_services_refuse_the_same_values(field, value):
    """The rule lives in budgets.services too, for every caller (commands, the console,
    platform code): a bad value never reaches the database as a 500."""
    user = make_user(user_id="xena")
    key, _ = make_key(user)
    for write in (
        lambda: accounts.user_create(user_id="yuri", **{field: value}),
        lambda: accounts.user_update(user_id="xena", **{field: value}),
        lambda: keys.api_key_create(user=user, **{field: value}),
        lambda: keys.api_key_create_with_user(**{field: value}),
        lambda: keys.api_key_update(key_id=key.pk, **{field: value}),
    ):
        with pytest.raises(InvalidRateLimit) as refused:
            write()
        assert refused.value.status == 422
        assert refused.value.message.startswith(f"{field}: ")
    assert GatewayUser.objects.count() == 1
    assert APIKey.objects.count() == 1


def test_the_largest_limits_are_accepted(admin):
    response = admin.post(
        "/v1/users",
        json={"user_id": "wide", "rpm_limit": 1_000_000_000, "tpm_limit": 1_000_000_000_000},
    )
    assert response.status_code == 200
    assert GatewayUser.objects.get(pk="wide").tpm_limit == 1_000_000_000_000


def test_openapi_describes_the_limits(gateway):
    with gateway.client() as client:
        components = client.get("/openapi.json").json()["components"]["schemas"]
    for request in ("CreateUserRequest", "PatchedUpdateUserRequest", "CreateKeyRequest"):
        properties = components[request]["properties"]
        assert properties["rpm_limit"]["minimum"] == 1
        assert properties["rpm_limit"]["maximum"] == 1_000_000_000
        assert properties["tpm_limit"]["maximum"] == 1_000_000_000_000
        assert properties["rpm_limit"]["nullable"] is True
    for response in ("UserResponse", "KeyInfo"):
        schema = components[response]
        assert {"rpm_limit", "tpm_limit"} <= set(schema["required"])
        assert schema["properties"]["rpm_limit"]["nullable"] is True


def test_a_key_limit_set_through_the_api_is_enforced(gateway, admin, settings, redis_url):
    """rpm_limit=2 set with PATCH /v1/keys/{id}, then three chat requests with the key:
    the third is a 429 with Retry-After and the X-RateLimit-* headers, and is logged."""
    settings.OTARI_RATELIMIT_REDIS_URL = redis_url
    set_price()
    key, secret = make_key(make_user(user_id="walt"))
    assert admin.patch(f"/v1/keys/{key.pk}", json={"rpm_limit": 2}).status_code == 200

    responses = [gateway.chat(secret, model="openai:gpt-4o-mini") for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 429]
    refused = responses[-1]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["1", "0", "0"]
    for response in responses:
        assert response.headers["X-RateLimit-Limit"] == "2"
        assert response.headers["X-RateLimit-Limit-Requests"] == "2"
        assert 0 < int(response.headers["X-RateLimit-Reset"]) <= 60
    retry_after = int(refused.headers["Retry-After"])
    assert 0 < retry_after <= 60
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "this API key may make 2 requests" in error["message"]
    assert gateway.fake.hits == 2
    assert sorted(UsageLog.objects.values_list("status_code", flat=True)) == [200, 200, 429]

    # Lifted through the API: the next request goes through, without rate-limit headers.
    assert admin.patch(f"/v1/keys/{key.pk}", json={"rpm_limit": None}).status_code == 200
    freed = gateway.chat(secret, model="openai:gpt-4o-mini")
    assert freed.status_code == 200
    assert not any(name.lower().startswith("x-ratelimit") for name in freed.headers)
