"""A gateway process keeps each key's caller between requests and lets ADMIT verify it
(llm_proxy.auth, budgets.services.holds ADMIT_CHECKED; docs/ARCHITECTURE.md): a known
key's successful request makes two round trips, and a change made anywhere else counts
from the very next request, as when every request loaded its caller."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from decimal import Decimal

import httpx
import psycopg
import pytest
from django.utils import timezone

from budgets.models import APIKey, GatewayUser, Hold
from tests.assertions import assert_books_balance
from tests.conftest import REDIS_URL, start_server_process
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = [pytest.mark.postgres]

MODEL = "openai:gpt-4o-mini"


@pytest.fixture(scope="module")
def other_process(gateway_config_file, django_db_setup):
    """A gateway in a process of its own, for the module: it keeps callers; the changes
    below are made from this one (the ORM, or the management API of the in-thread
    gateway)."""
    server = start_server_process(gateway_config_file, OTARI_RATELIMIT_REDIS_URL=REDIS_URL)
    yield server
    server.kill()


def chat(server, secret: str, **body) -> httpx.Response:
    body.setdefault("model", MODEL)
    body.setdefault("messages", [{"role": "user", "content": "Say hello to the test suite"}])
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


@pytest.fixture
def carol():
    set_price()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10")), user_id="carol")
    key, secret = make_key(user)
    return user, key, secret


def warm(server, secret: str) -> None:
    """Two successful requests: the first loads and keeps the caller, the second is
    admitted on the kept one."""
    for _ in range(2):
        response = chat(server, secret)
        assert response.status_code == 200, response.text


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def _revoke(admin, user, key):
    assert admin.delete(f"/v1/keys/{key.pk}").status_code == 204


def _deactivate(admin, user, key):
    APIKey.objects.filter(pk=key.pk).update(is_active=False)


def _expire(admin, user, key):
    APIKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def _block(admin, user, key):
    assert admin.patch(f"/v1/users/{user.pk}", json={"blocked": True}).is_success


def _delete_user(admin, user, key):
    assert admin.delete(f"/v1/users/{user.pk}").status_code == 204


def _lower_budget(admin, user, key):
    assert admin.patch(f"/v1/budgets/{user.budget_id}", json={"max_budget": 0}).is_success


def _key_models(admin, user, key):
    patched = admin.patch(f"/v1/keys/{key.pk}", json={"allowed_models": ["openai:gpt-4o"]})
    assert patched.is_success


def _user_models(admin, user, key):
    GatewayUser.objects.filter(pk=user.pk).update(allowed_models=[])


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        (_revoke, 401, "api_key_inactive"),
        (_deactivate, 401, "api_key_inactive"),
        (_expire, 401, "api_key_expired"),
        (_block, 403, "user_blocked"),
        (_delete_user, 401, "api_key_inactive"),
        (_lower_budget, 403, "budget_exceeded"),
        (_key_models, 403, "model_not_allowed"),
        (_user_models, 403, "model_not_allowed"),
    ],
)
def test_a_refusing_change_counts_from_the_next_request(
    other_process, admin, carol, change, status, code
):
    user, key, secret = carol
    warm(other_process, secret)
    holds_before = Hold.objects.count()

    change(admin, user, key)

    refused(chat(other_process, secret), status, code)
    assert Hold.objects.count() == holds_before


def test_a_rotated_keys_old_secret_is_refused_from_the_next_request(other_process, admin, carol):
    _user, key, secret = carol
    warm(other_process, secret)

    rotated = admin.post(f"/v1/keys/{key.pk}/rotate")
    assert rotated.is_success

    refused(chat(other_process, secret), 401, "invalid_api_key")
    assert chat(other_process, rotated.json()["key"]).status_code == 200


def test_a_rate_limit_counts_from_the_next_request(other_process, admin, carol, redis_url):
    _user, key, secret = carol
    warm(other_process, secret)

    assert admin.patch(f"/v1/keys/{key.pk}", json={"rpm_limit": 1}).is_success

    counted = chat(other_process, secret)
    assert counted.status_code == 200
    assert counted.headers["X-RateLimit-Limit-Requests"] == "1"
    refused(chat(other_process, secret), 429, "rate_limit_exceeded")


def test_excluding_a_key_from_budget_counts_from_the_next_request(other_process, admin, carol):
    _user, key, secret = carol
    warm(other_process, secret)
    holds_before = Hold.objects.count()

    assert admin.patch(f"/v1/keys/{key.pk}", json={"exclude_from_budget": True}).is_success

    assert chat(other_process, secret).status_code == 200
    assert Hold.objects.count() == holds_before
    assert UsageLog.objects.latest("timestamp").counts_toward_budget is False


# Stages spend over the budget's max by writing it directly.
@pytest.mark.books_unbalanced
def test_a_removed_topup_counts_from_the_next_request(other_process, admin, carol):
    user, _key, secret = carol
    expires = (timezone.now() + timedelta(hours=1)).isoformat()
    topup = {"amount": 5, "expires_at": expires}
    assert admin.post(f"/v1/users/{user.pk}/topup", json=topup).is_success
    # Over the max (10), within the max and the top-up (15): admitted on the top-up.
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("12"))
    warm(other_process, secret)

    assert admin.post(f"/v1/users/{user.pk}/topup", json={"amount": 0}).is_success

    refused(chat(other_process, secret), 403, "budget_exceeded")


def test_a_new_price_counts_from_the_next_request(other_process, admin, carol):
    user, _key, secret = carol
    warm(other_process, secret)

    body = {"model_key": MODEL, "input_price_per_million": 3, "output_price_per_million": 6}
    assert admin.post("/v1/pricing", json=body).status_code == 200

    response = chat(other_process, secret)
    assert response.status_code == 200
    usage = response.json()["usage"]
    rates = Rates(input_per_mtok=Decimal(3), output_per_mtok=Decimal(6))
    cost = cost_usd(
        TokenUsage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]),
        rates,
    )
    assert Decimal(response.headers["X-Otari-Cost-Usd"]) == cost
    assert UsageLog.objects.latest("timestamp").cost_usd == cost
    assert_books_balance(user)


def test_a_key_expiring_between_requests_is_refused(other_process, transactional_db, carol):
    _user, key, secret = carol
    expires_at = timezone.now() + timedelta(seconds=2)
    APIKey.objects.filter(pk=key.pk).update(expires_at=expires_at)
    warm(other_process, secret)

    # Nothing changes in the database: the time passes.
    time.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()) + 0.1)

    refused(chat(other_process, secret), 401, "api_key_expired")


# --- round trips -------------------------------------------------------------------------


POOL_UPKEEP = {"", "SET TIME ZONE 'UTC'"}


@pytest.fixture
def statements(monkeypatch) -> list[str]:
    """Every statement the gateway sends to PostgreSQL: on the hot path's pool (asyncio
    cursors) and through the ORM in any thread but the test's own. Not the pool's
    upkeep, which is per connection, not per request: a new connection's time zone, the
    check of one idle for over a second (common.pgpool)."""
    sent: list[str] = []
    test_thread = threading.get_ident()
    async_execute = psycopg.AsyncCursor.execute
    sync_execute = psycopg.Cursor.execute
    sync_executemany = psycopg.Cursor.executemany

    async def counted_async(self, query, *args, **kwargs):
        if str(query) not in POOL_UPKEEP:
            sent.append(str(query))
        return await async_execute(self, query, *args, **kwargs)

    def counted_sync(self, query, *args, **kwargs):
        if threading.get_ident() != test_thread:
            sent.append(str(query))
        return sync_execute(self, query, *args, **kwargs)

    def counted_many(self, query, *args, **kwargs):
        if threading.get_ident() != test_thread:
            sent.append(str(query))
        return sync_executemany(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", counted_async)
    monkeypatch.setattr(psycopg.Cursor, "execute", counted_sync)
    monkeypatch.setattr(psycopg.Cursor, "executemany", counted_many)
    return sent


def settled(request_count: int) -> None:
    """Wait until `request_count` usage rows are written (settlement may finish after
    the response)."""
    deadline = time.monotonic() + 10
    while UsageLog.objects.count() < request_count:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_known_keys_successful_request_makes_two_round_trips(gateway, carol, statements):
    user, _key, secret = carol

    assert gateway.chat(secret, model=MODEL).status_code == 200
    settled(1)
    # The key's first request loads its caller: load, hold, settle.
    assert len(statements) == 3, statements
    statements.clear()

    for count in (2, 3):
        assert gateway.chat(secret, model=MODEL).status_code == 200
        settled(count)
        # Then: hold (verifying the kept caller), settle.
        assert len(statements) == 2, statements
        assert "INSERT INTO budgets_hold" in statements[0]
        statements.clear()
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)


def test_a_changed_caller_costs_one_reload(gateway, admin, carol, statements):
    user, _key, secret = carol
    for count in (1, 2):
        assert gateway.chat(secret, model=MODEL).status_code == 200
        settled(count)
    assert admin.patch(f"/v1/budgets/{user.budget_id}", json={"max_budget": 20}).is_success
    statements.clear()

    response = gateway.chat(secret, model=MODEL)

    assert response.status_code == 200
    assert response.headers["X-Otari-Budget-Remaining-Usd"].startswith("19.9")
    settled(3)
    # The kept caller's hold took nothing; then load, hold, settle.
    assert len(statements) == 4, statements
    assert_books_balance(user)


def tight_user(budget_usd: str = "0.0005") -> tuple[GatewayUser, str]:
    """A user whose budget a few requests exhaust, and its key's secret."""
    set_price()
    user = make_user(budget=make_budget(max_budget_usd=Decimal(budget_usd)), user_id="tight")
    _key, secret = make_key(user)
    return user, secret


def spend_a_little(gateway, secret: str) -> None:
    """Two small requests: the key's caller is kept, and some money is spent."""
    for count in (1, 2):
        assert gateway.chat(secret, model=MODEL, max_tokens=10).status_code == 200
        settled(count)


@pytest.mark.parametrize(
    ("budget_usd", "body", "fix"),
    [
        # A maximum the client set is kept, and refused with the one that fits.
        ("0.0005", {"max_tokens": 2000}, "Set max_completion_tokens or max_tokens to "),
        # No maximum set, and not even the smallest one the gateway would fit (16 tokens,
        # OTARI_FIT_MIN_OUTPUT_TOKENS) fits what is left: $0.000010 after two requests of
        # $0.000007 (7 prompt tokens at $0.15/Mtok, 10 output at $0.60).
        ("0.000024", {}, "(1024 output tokens at most)"),
    ],
    ids=["client-maximum", "below-the-floor"],
)
def test_a_known_keys_refusal_for_budget_makes_two_round_trips(
    gateway, statements, settings, budget_usd, body, fix
):
    user, secret = tight_user(budget_usd)
    spend_a_little(gateway, secret)
    user.refresh_from_db()
    spent = user.spend_usd
    statements.clear()

    response = gateway.chat(secret, model=MODEL, **body)

    refused(response, 403, "budget_exceeded")
    message = response.json()["error"]["message"]
    left = f"{(Decimal(budget_usd) - spent).normalize():f}"
    budget = f"{Decimal(budget_usd).normalize():f}"
    assert message.startswith(f"Budget exceeded: ${left} left of ${budget}"), message
    assert fix in message, message
    assert response.headers["X-Otari-Budget-Remaining-Usd"] == left
    # The hold that took nothing and said why, then the usage row.
    assert len(statements) == 2, statements
    assert "UNION ALL" in statements[0]
    row = UsageLog.objects.get(pk=response.headers["X-Otari-Request-Id"])
    assert (row.status, row.status_code, row.error_code) == ("error", 403, "budget_exceeded")
    assert row.error_message == message

    # The same refusal, word for word, as a caller loaded afresh gets it.
    settings.OTARI_CALLER_REUSE = False
    fresh = gateway.chat(secret, model=MODEL, **body)
    refused(fresh, 403, "budget_exceeded")
    assert fresh.json()["error"]["message"] == message
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (spent, 0)
    assert_books_balance(user)


def test_a_known_keys_request_fitted_to_what_is_left_is_served(gateway, statements):
    """A request that sets no output maximum, refused at its default by ADMIT_CHECKED, is
    admitted from a fresh load with the maximum that fits what is left ($0.0005 less two
    small requests: the default 1,024 output tokens at $0.60/Mtok, ~$0.0006, do not)."""
    user, secret = tight_user("0.0005")
    spend_a_little(gateway, secret)
    statements.clear()

    response = gateway.chat(secret, model=MODEL)

    assert response.status_code == 200, response.text
    fitted = int(response.headers["X-Otari-Max-Tokens"])
    assert 16 <= fitted < 1024
    assert gateway.fake.last_request.body["max_completion_tokens"] == fitted
    settled(3)
    # The hold that took nothing, the load, the fitted hold, the settlement.
    assert len(statements) == 4, statements
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)
