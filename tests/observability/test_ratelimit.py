"""Rate limits per user and per key, through HTTP into the ASGI app: requests and tokens
per window, shared by gateway processes through Redis (llm_proxy/ratelimit.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from decimal import Decimal

import httpx
import pytest

from budgets.models import Hold
from llm_proxy import ratelimit
from tests.conftest import start_server_process
from tests.factories import make_budget, make_key, make_user, priced, set_price
from tests.fake_platform import GATEWAY_TOKEN, FakePlatform, attempt
from tests.observability.conftest import scrape, value
from usage.models import UsageLog

PROMPT = "x" * 40  # 10 prompt tokens, by the gateway's estimate and the fake's count
# The fake answers with 20 completion tokens: 30 tokens per request; the gateway counts
# 10 + max_tokens at admission and corrects that to 30 when the request ends.
TOKENS_USED = 30


def _chat(gateway, secret: str, **body) -> httpx.Response:
    body.setdefault("model", "openai:gpt-4o-mini")
    body.setdefault("max_tokens", 100)
    body.setdefault("messages", [{"role": "user", "content": PROMPT}])
    return gateway.post("/v1/chat/completions", secret, body)


@pytest.fixture(params=["redis", "memory"])
def backend(request, settings) -> str:
    """Run a test against the shared counters (Redis) and the per-process fallback."""
    if request.param == "redis":
        settings.OTARI_RATELIMIT_REDIS_URL = request.getfixturevalue("redis_url")
    else:
        settings.OTARI_RATELIMIT_REDIS_URL = ""
    return request.param


# --- across processes ----------------------------------------------------------------------

WINDOW_S = 10


async def _fire(urls: list[str], secret: str, n: int) -> list[httpx.Response]:
    # max_tokens = the fake's 20 completion tokens: the estimate is exact, so nothing is
    # corrected at settlement and each response's headers show its count at admission.
    body = {
        "model": "openai:gpt-4o-mini",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{urls[i % len(urls)]}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {secret}"},
                )
                for i in range(n)
            )
        )


@pytest.fixture
def two_gateways(gateway, gateway_config_file, redis_url):
    servers = [
        start_server_process(
            gateway_config_file,
            OTARI_RATELIMIT_REDIS_URL=redis_url,
            OTARI_RATELIMIT_WINDOW_SECONDS=str(WINDOW_S),
        )
        for _ in range(2)
    ]
    yield [server.url for server in servers]
    for server in servers:
        server.kill()


@pytest.mark.postgres
@pytest.mark.slow
def test_rpm_20_admits_exactly_20_of_40_concurrent_requests_on_two_processes(gateway, two_gateways):
    set_price()
    user = make_user(rpm_limit=20)
    _, secret = make_key(user)

    responses = asyncio.run(_fire(two_gateways, secret, 40))

    assert Counter(r.status_code for r in responses) == {200: 20, 429: 20}
    assert gateway.fake.hits == 20
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    # Each admitted request saw its own count: the 20 admissions were serialised.
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == list(range(20))
    assert {r.headers["X-RateLimit-Limit"] for r in responses} == {"20"}
    for r in refused:
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "20 requests per 10 s" in error["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= WINDOW_S
        assert r.headers["X-RateLimit-Remaining"] == "0"
    # Refused requests are logged (docs/SPEC.md §5) and took no hold.
    rows = UsageLog.objects.filter(user=user)
    assert rows.count() == 40
    assert {str(row.id) for row in rows.filter(status_code=429)} == {
        r.headers["X-Otari-Request-Id"] for r in refused
    }
    assert Hold.objects.filter(user=user).count() == 20
    assert not Hold.objects.filter(user=user, status=Hold.Status.OPEN).exists()

    # The limit lifts when the window ends.
    time.sleep(max(int(r.headers["Retry-After"]) for r in refused))
    for url, remaining in zip(two_gateways, ("19", "18"), strict=True):
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "openai:gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Remaining"] == remaining


# --- tokens per minute -----------------------------------------------------------------------


def test_tpm_trips_at_the_configured_value_not_before(gateway, backend):
    set_price()
    user = make_user(tpm_limit=3 * TOKENS_USED)
    _, secret = make_key(user)

    remaining = []
    for _ in range(3):
        # Admitted although 60 counted + this request's estimate (110) is over 90: the
        # estimates of the earlier requests were corrected to what they used.
        response = _chat(gateway, secret)
        assert response.status_code == 200
        assert response.json()["usage"]["total_tokens"] == TOKENS_USED
        remaining.append(response.headers["X-RateLimit-Remaining-Tokens"])
    assert remaining == ["60", "30", "0"]

    refused = _chat(gateway, secret)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "this user may use 90 tokens per minute" in refused.json()["error"]["message"]
    assert refused.headers["X-RateLimit-Limit"] == "90"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert gateway.fake.hits == 3


def test_streamed_tokens_are_corrected_when_the_stream_ends(gateway, backend):
    set_price()
    model = priced("gpt-4o-mini-chunks-7")
    user = make_user(tpm_limit=1000)
    _, secret = make_key(user)
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": model,
                "stream": True,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        # Headers go out at admission: the estimate is counted, 10 + 100 tokens.
        assert response.headers["X-RateLimit-Remaining-Tokens"] == str(1000 - 110)
        assert "X-Otari-Overhead-Ms" not in response.headers
        response.read()

    after = _chat(gateway, secret)
    assert after.headers["X-RateLimit-Remaining-Tokens"] == str(1000 - (10 + 7) - TOKENS_USED)


# --- whose limits ------------------------------------------------------------------------------


def test_a_keys_limits_bind_that_key_and_the_users_bind_all_its_keys(gateway, backend):
    set_price()
    user = make_user()
    _, limited = make_key(user, rpm_limit=2)
    _, free = make_key(user)

    assert [_chat(gateway, limited).status_code for _ in range(3)] == [200, 200, 429]
    assert "this API key may make 2 requests" in _chat(gateway, limited).json()["error"]["message"]
    unlimited = _chat(gateway, free)
    assert unlimited.status_code == 200
    assert not any(name.lower().startswith("x-ratelimit") for name in unlimited.headers)

    shared = make_user(rpm_limit=3)
    _, first = make_key(shared)
    _, second = make_key(shared, tpm_limit=10_000)
    statuses = [_chat(gateway, key).status_code for key in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]
    refused = _chat(gateway, second)
    assert "this user may make 3 requests" in refused.json()["error"]["message"]
    # Both limits are described: the user's requests and the key's tokens.
    assert refused.headers["X-RateLimit-Limit-Requests"] == "3"
    assert refused.headers["X-RateLimit-Limit-Tokens"] == "10000"


def test_a_budget_refusal_counts_the_request_but_not_its_tokens(gateway, backend):
    set_price()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0")), rpm_limit=10, tpm_limit=500)
    _, secret = make_key(user)

    response = _chat(gateway, secret)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert response.headers["X-RateLimit-Remaining-Requests"] == "9"
    assert response.headers["X-RateLimit-Remaining-Tokens"] == "500"
    assert gateway.fake.hits == 0


def test_an_unreachable_redis_lets_requests_through_and_is_counted(
    gateway, settings, caplog, monkeypatch
):
    # The warning is logged once a minute per process: an earlier test's may be recent.
    monkeypatch.setattr(ratelimit, "_last_failure_log", float("-inf"))
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_PUBLIC = True
    settings.OTARI_RATELIMIT_REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    set_price()
    _, limited = make_key(make_user(rpm_limit=1))
    _, unlimited = make_key(make_user())

    def backend_errors() -> float:
        text = gateway.client().get("/metrics").text
        return value(scrape(text), "otari_ratelimit_backend_errors_total")

    before = backend_errors()

    # A caller without limits never talks to Redis at all.
    assert _chat(gateway, unlimited).status_code == 200
    assert backend_errors() == before
    statuses = [_chat(gateway, limited).status_code for _ in range(2)]

    assert statuses == [200, 200]
    # Each admission tried and failed (and, admitted uncounted, nothing to correct after).
    assert backend_errors() - before == 2
    assert any("Rate limits not enforced" in r.getMessage() for r in caplog.records)


def test_over_the_limit_on_messages_is_an_anthropic_rate_limit_error(gateway, backend):
    model = "anthropic:claude-3-5-haiku-latest"
    set_price(model, "1", "5")
    _, secret = make_key(make_user(rpm_limit=1))
    body = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]}
    with gateway.client() as client:
        ok, refused = (
            client.post("/v1/messages", json=body, headers={"x-api-key": secret}) for _ in range(2)
        )

    assert ok.status_code == 200
    assert ok.headers["X-RateLimit-Remaining"] == "0"
    assert refused.status_code == 429
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["message"].startswith("Rate limit exceeded")
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_platform_users_limits_apply_to_requests_made_with_their_platform_token(
    gateway, backend, settings
):
    token = "ptok-rate-limited-user"
    with FakePlatform(users={token: "plat-limited"}) as platform:
        settings.OTARI_PLATFORM_URL, settings.OTARI_PLATFORM_TOKEN = platform.url, GATEWAY_TOKEN
        settings.CELERY_BROKER_URL = ""
        platform.fresh_ids = True
        platform.attempts = [attempt("rl", "openai", "gpt-4o-mini", api_base=gateway.fake.base_url)]
        set_price()
        make_user(user_id="plat-limited", rpm_limit=1)

        statuses = [_chat(gateway, token).status_code for _ in range(2)]

    assert statuses == [200, 429]
    assert gateway.fake.hits == 1
