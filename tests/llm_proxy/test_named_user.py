"""One identity rule on every generation endpoint (issue 19, item 6; docs/SPEC.md §1): a
request names its user in `user` or in `metadata.user_id`, read the same way by every API;
a key's request naming another user in either is a 403 `user_mismatch` in that API's
shape, unless OTARI_REJECT_USER_MISMATCH is off (then the key's user is billed)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llm_proxy.routing import store
from tests.conftest import MASTER_KEY
from tests.factories import make_budget, make_key, make_user, set_price
from tests.llm_proxy.apis import body_for, error_shape_ok
from usage.models import UsageLog

pytestmark = pytest.mark.postgres

ENDPOINTS = {
    "chat": ("/v1/chat/completions", body_for("chat", "openai:m")),
    "messages": ("/v1/messages", body_for("messages", "anthropic:m")),
    "responses": ("/v1/responses", body_for("responses", "openai:m")),
    "embeddings": (
        "/v1/embeddings",
        {"model": "openai:text-embedding-3-small", "input": "Say hello to the test suite"},
    ),
}
# Both fields, on every endpoint (the Messages API has no `user`, but a client may send it).
NAMES = {
    "user": lambda name: {"user": name},
    "metadata.user_id": lambda name: {"metadata": {"user_id": name}},
}


@pytest.fixture
def finn():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="finn")
    make_user(user_id="gwen")
    for selector in ("openai:m", "anthropic:m", "openai:text-embedding-3-small"):
        set_price(selector, "0.15", "0.60")
    return make_key(user)[1]


def _shape(api: str) -> str:
    return "messages" if api == "messages" else "chat"


@pytest.mark.parametrize("field", NAMES)
@pytest.mark.parametrize("api", ENDPOINTS)
def test_a_key_naming_another_user_is_refused_on_every_endpoint(gateway, finn, api, field):
    path, body = ENDPOINTS[api]
    response = gateway.post(path, finn, {**body, **NAMES[field]("gwen")})
    assert response.status_code == 403, response.text
    payload = response.json()
    assert error_shape_ok(_shape(api), payload)
    assert payload["error"]["type"] == "permission_error"
    if api != "messages":
        assert payload["error"]["code"] == "user_mismatch"
    assert gateway.fake.hits == 0
    # The refusal is on the key's user's log, and nothing was charged.
    row = UsageLog.objects.get()
    assert (row.user_id, row.status_code, row.cost_usd or 0) == ("finn", 403, 0)

    # Naming the key's own user is fine.
    response = gateway.post(path, finn, {**body, **NAMES[field]("finn")})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("api", ENDPOINTS)
def test_with_the_rule_off_the_name_is_ignored_and_the_keys_user_billed(
    gateway, finn, api, settings
):
    settings.OTARI_REJECT_USER_MISMATCH = False
    path, body = ENDPOINTS[api]
    named = {"user": "gwen", "metadata": {"user_id": "gwen"}}
    if api == "embeddings":
        named = {"user": "gwen"}
    response = gateway.post(path, finn, {**body, **named})
    assert response.status_code == 200, response.text
    row = UsageLog.objects.get()
    assert (row.user_id, row.status_code) == ("finn", 200)
    assert row.cost_usd > 0


@pytest.mark.parametrize("api", ENDPOINTS)
def test_the_master_key_bills_the_user_named_in_either_field(gateway, finn, api, settings):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    path, body = ENDPOINTS[api]
    for field in NAMES:
        response = gateway.post(path, MASTER_KEY, {**body, **NAMES[field]("gwen")})
        assert response.status_code == 200, response.text
    assert list(UsageLog.objects.values_list("user_id", flat=True)) == ["gwen", "gwen"]
    # Two names that disagree: whom to bill is not guessed.
    both = {"user": "gwen", "metadata": {"user_id": "finn"}}
    response = gateway.post(path, MASTER_KEY, {**body, **both})
    assert response.status_code == 403
    assert error_shape_ok(_shape(api), response.json())


def test_the_rule_holds_for_a_routed_model_name(gateway, finn):
    """A routing alias is admitted by its own path (llm_proxy.pipeline.admission)."""
    store.alias_create(name="quick", target="openai:m")
    body = body_for("chat", "quick")
    response = gateway.post("/v1/chat/completions", finn, {**body, "user": "gwen"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "user_mismatch"
    assert gateway.fake.hits == 0
    assert gateway.post("/v1/chat/completions", finn, {**body, "user": "finn"}).status_code == 200
