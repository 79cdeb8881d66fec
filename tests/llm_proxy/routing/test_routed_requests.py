"""Aliases and routing policies through HTTP into the gateway (docs/ROUTING.md): the plan's
targets tried in order up to the commit point, the money exact across every attempt,
the caller seeing the policy's name, health skipping a target that keeps failing."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from decimal import Decimal

import httpx
import pytest

from budgets.models import GatewayUser, Hold
from budgets.selectors import books_drift_list
from budgets.services import holds
from llm_proxy.routing import store
from tests.conftest import start_server_process
from tests.factories import make_budget, make_key, make_user, set_price
from tests.llm_proxy.apis import PATHS, body_for, sse_events
from usage.ledger import UsageRecord
from usage.models import UsageLog
from usage.pricing import TokenUsage

pytestmark = [pytest.mark.postgres]

CHEAP = ("1", "2")
DEAR = ("100", "200")


def post(gateway, secret: str, api: str, model: str, *, stream: bool = False) -> httpx.Response:
    return gateway.post(PATHS[api], secret, body_for(api, model, stream=stream))


def models_seen(response: httpx.Response, stream: bool) -> set[str]:
    """Every `model` the client was shown: the answer's, or each stream event's."""
    if not stream:
        body = response.json()
        return {body.get("model") or body.get("response", {}).get("model")}
    seen = set()
    for _, data in sse_events(response.text):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        for holder in (event, event.get("message") or {}, event.get("response") or {}):
            if "model" in holder:
                seen.add(holder["model"])
    return seen


def assert_books_closed(user: GatewayUser) -> None:
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert books_drift_list() == []


@pytest.fixture
def caller():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("50")))
    _, secret = make_key(user)
    return user, secret


def test_an_alias_serves_its_target_under_its_own_name(gateway, caller):
    user, secret = caller
    set_price("openai:gpt-4o-mini", *CHEAP)
    store.alias_create(name="quick", target="openai:gpt-4o-mini")

    response = post(gateway, secret, "chat", "quick")

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "quick"
    row = UsageLog.objects.get()
    assert (row.provider, row.model, row.status) == ("openai", "gpt-4o-mini", "success")
    user.refresh_from_db()
    assert user.spend_usd == row.cost_usd == Decimal(response.headers["X-Otari-Cost-Usd"])
    assert_books_closed(user)


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("head", ["dead:gpt-4o-mini", "openai:fail-500"])
def test_failover_from_a_failing_head_serves_charges_once_and_absorbs_the_failure(
    gateway, caller, api, stream, head
):
    user, secret = caller
    set_price(head, *CHEAP)
    set_price("anthropic:claude-3-5-haiku", *CHEAP)
    store.policy_save(
        name="sturdy",
        spec={"select": [{"default": head}], "on_failure": ["anthropic:claude-3-5-haiku"]},
    )

    response = post(gateway, secret, api, "sturdy", stream=stream)

    assert response.status_code == 200, response.text
    assert models_seen(response, stream) == {"sturdy"}
    served = UsageLog.objects.get(status="success")
    absorbed = UsageLog.objects.get(status="absorbed")
    assert (served.provider, served.model) == ("anthropic", "claude-3-5-haiku")
    assert str(served.pk) == response.headers["X-Otari-Request-Id"]
    assert (absorbed.provider, absorbed.model) == tuple(head.split(":"))
    assert (absorbed.cost_usd, absorbed.counts_toward_budget) == (None, False)
    assert absorbed.error_code in ("provider_unreachable", "provider_error")
    user.refresh_from_db()
    assert user.spend_usd == served.cost_usd > 0
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert_books_closed(user)


def test_a_dearer_fallback_that_does_not_fit_stops_the_chain_with_nothing_held(gateway):
    set_price("openai:fail-500", *CHEAP)
    set_price("anthropic:claude-3-5-haiku", *DEAR)
    store.policy_save(
        name="pricey",
        spec={
            "select": [{"default": "openai:fail-500"}],
            "on_failure": ["anthropic:claude-3-5-haiku"],
        },
    )
    # Room for the cheap head's hold, not for the dear fallback's.
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.01")))
    _, secret = make_key(user)

    response = post(gateway, secret, "chat", "pricey")

    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert len(gateway.fake.requests) == 1  # the head only
    refused = UsageLog.objects.get(pk=response.headers["X-Otari-Request-Id"])
    assert (refused.error_code, refused.model) == ("budget_exceeded", "claude-3-5-haiku")
    assert UsageLog.objects.filter(status="absorbed").count() == 1
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    user.refresh_from_db()
    assert user.spend_usd == 0
    assert_books_closed(user)


def test_a_dearer_fallback_that_fits_grows_the_hold_and_is_charged_its_own_price(gateway, caller):
    user, secret = caller
    set_price("openai:fail-500", *CHEAP)
    set_price("anthropic:claude-3-5-haiku", *DEAR)
    store.policy_save(
        name="grow",
        spec={
            "select": [{"default": "openai:fail-500"}],
            "on_failure": ["anthropic:claude-3-5-haiku"],
        },
    )

    response = post(gateway, secret, "chat", "grow")

    assert response.status_code == 200, response.text
    hold = Hold.objects.get()
    served = UsageLog.objects.get(status="success")
    # The hold grew to the dearer attempt's estimate, which covered its real cost.
    assert hold.amount_usd >= served.cost_usd > 0
    assert hold.model_key == "anthropic:claude-3-5-haiku"
    user.refresh_from_db()
    assert user.spend_usd == served.cost_usd
    assert_books_closed(user)


def _charge(user: GatewayUser, cost: Decimal) -> None:
    """Spend `cost` through the money core, as a served request does."""
    request_id = uuid.uuid4()
    holds.hold_open(
        user_id=user.user_id,
        request_id=request_id,
        amount_usd=cost,
        model_key="openai:gpt-4o-mini",
        now=holds.timezone.now(),
    )
    holds.hold_settle(
        record=UsageRecord(
            request_id=request_id,
            user_id=user.user_id,
            api_key_id=None,
            endpoint="/v1/chat/completions",
            provider="openai",
            model="gpt-4o-mini",
            status="success",
            status_code=200,
            usage=TokenUsage(input_tokens=1, output_tokens=1),
            cost_usd=cost,
        ),
        now=holds.timezone.now(),
    )


def test_a_budget_tier_switches_targets_at_the_threshold(gateway):
    set_price("openai:gpt-4o-mini", *CHEAP)
    set_price("openai:gpt-4o-mini-small", *CHEAP)
    store.policy_save(
        name="thrifty",
        spec={
            "select": [
                {"when": {"budget_used_pct": {"gte": 50}}, "target": "openai:gpt-4o-mini-small"},
                {"default": "openai:gpt-4o-mini"},
            ]
        },
    )
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10")))
    _, secret = make_key(user)

    _charge(user, Decimal("4.999999"))
    assert post(gateway, secret, "chat", "thrifty").status_code == 200
    _charge(user, Decimal("0.000001"))
    user.refresh_from_db()
    assert user.spend_usd >= Decimal("5")
    assert post(gateway, secret, "chat", "thrifty").status_code == 200

    served = UsageLog.objects.filter(latency_ms__isnull=False).order_by("timestamp")
    assert [row.model for row in served] == ["gpt-4o-mini", "gpt-4o-mini-small"]
    assert_books_closed(user)


def test_a_weighted_split_follows_its_weights(gateway, caller):
    user, secret = caller
    set_price("openai:gpt-4o-mini", *CHEAP)
    set_price("anthropic:claude-3-5-haiku", *CHEAP)
    store.policy_save(
        name="balanced",
        spec={
            "select": [
                {
                    "router": "weighted",
                    "candidates": ["openai:gpt-4o-mini", "anthropic:claude-3-5-haiku"],
                    "weights": {"openai:gpt-4o-mini": 3, "anthropic:claude-3-5-haiku": 1},
                },
                {"default": "openai:gpt-4o-mini"},
            ]
        },
    )
    with gateway.client(secret) as client:
        for _ in range(200):
            response = client.post(PATHS["chat"], json=body_for("chat", "balanced"))
            assert response.status_code == 200

    providers = Counter(UsageLog.objects.values_list("provider", flat=True))
    # 150 expected; four standard deviations (6.1 each) either side.
    assert 125 <= providers["openai"] <= 175
    assert providers["openai"] + providers["anthropic"] == 200
    assert_books_closed(user)


@pytest.fixture
def quick_cooldown(settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 2
    settings.OTARI_ROUTING_COOLDOWN_SECONDS = 1


def test_a_target_that_keeps_failing_cools_down_and_comes_back(gateway, caller, quick_cooldown):
    user, secret = caller
    set_price("dead:gpt-4o-mini", *CHEAP)
    set_price("openai:gpt-4o-mini", *CHEAP)
    store.policy_save(
        name="flaky",
        spec={"select": [{"default": "dead:gpt-4o-mini"}], "on_failure": ["openai:gpt-4o-mini"]},
    )

    def absorbed() -> int:
        return UsageLog.objects.filter(status="absorbed").count()

    for _ in range(2):
        assert post(gateway, secret, "chat", "flaky").status_code == 200
    assert absorbed() == 2
    # Cooling down: skipped, not tried.
    assert post(gateway, secret, "chat", "flaky").status_code == 200
    assert absorbed() == 2
    time.sleep(1.2)
    assert post(gateway, secret, "chat", "flaky").status_code == 200
    assert absorbed() == 3
    assert UsageLog.objects.filter(status="success").count() == 4
    assert_books_closed(user)


def test_when_every_target_cools_down_the_last_one_is_still_tried(gateway, caller, quick_cooldown):
    user, secret = caller
    set_price("dead:gpt-4o-mini", *CHEAP)
    store.policy_save(name="doomed", spec={"select": [{"default": "dead:gpt-4o-mini"}]})

    for _ in range(3):
        response = post(gateway, secret, "chat", "doomed")
        assert response.status_code == 502
    # Every request tried the target (one usage row each, and nothing absorbed: no
    # failover happened), though it was cooling down by the third.
    assert UsageLog.objects.filter(status="error").count() == 3
    assert_books_closed(user)


@pytest.mark.slow
def test_two_gateway_processes_share_the_cooldown(gateway, gateway_config_file, caller, redis_url):
    user, secret = caller
    set_price("dead:gpt-4o-mini", *CHEAP)
    set_price("openai:gpt-4o-mini", *CHEAP)
    store.policy_save(
        name="shared",
        spec={"select": [{"default": "dead:gpt-4o-mini"}], "on_failure": ["openai:gpt-4o-mini"]},
    )
    env = {
        "OTARI_RATELIMIT_REDIS_URL": redis_url,
        "OTARI_ROUTING_FAILURE_THRESHOLD": "2",
        "OTARI_ROUTING_COOLDOWN_SECONDS": "30",
    }
    first, second = (start_server_process(gateway_config_file, **env) for _ in range(2))
    try:
        for _ in range(2):
            response = httpx.post(
                f"{first.url}/v1/chat/completions",
                json=body_for("chat", "shared"),
                headers={"Authorization": f"Bearer {secret}"},
                timeout=30,
            )
            assert response.status_code == 200
        response = httpx.post(
            f"{second.url}/v1/chat/completions",
            json=body_for("chat", "shared"),
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )
        assert response.status_code == 200
    finally:
        first.kill()
        second.kill()
    # The second process skipped the target the first one found failing.
    assert UsageLog.objects.filter(status="absorbed").count() == 2
    assert_books_closed(user)


def test_a_keys_allowed_models_may_name_the_policy(gateway):
    set_price("openai:gpt-4o-mini", *CHEAP)
    store.alias_create(name="quick", target="openai:gpt-4o-mini")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    _, by_name = make_key(user, allowed_models=["quick"])
    _, by_target = make_key(user, allowed_models=["openai:*"])
    _, neither = make_key(user, allowed_models=["anthropic:*"])

    assert post(gateway, by_name, "chat", "quick").status_code == 200
    assert post(gateway, by_target, "chat", "quick").status_code == 200
    refused = post(gateway, neither, "chat", "quick")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    # The refusal is the caller's and leaves its row, under the name it sent.
    row = UsageLog.objects.get(pk=refused.headers["X-Otari-Request-Id"])
    assert (row.model, row.error_code) == ("quick", "model_not_allowed")
    assert_books_closed(user)


def test_a_name_that_is_no_policy_is_refused_as_a_selector(gateway, caller):
    _, secret = caller
    refused = post(gateway, secret, "chat", "no-such-policy")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_model"
