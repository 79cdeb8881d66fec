"""Budgets under concurrency across processes, and holds left by a dead process.

Real PostgreSQL, real gateway processes (uvicorn), real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from decimal import Decimal

import httpx
import pytest
from django.db import connections
from django.db.models import Sum

from budgets import services
from budgets.models import GatewayUser, Hold
from tests.assertions import assert_books_balance
from tests.conftest import start_server_process
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog
from usage.pricing import Rates, estimate_usd

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# Every request is slow, so no admitted request settles (and frees budget, its real cost
# being below its estimate) before all of them have been through admission.
MODEL = "openai:gpt-4o-mini-slow-1500-chunks-5"
RATES = Rates(input_per_mtok=Decimal("10"), output_per_mtok=Decimal("10"))
PROMPT = "x" * 40
MAX_TOKENS = 100


class PeakSampler(threading.Thread):
    """Polls spend + reserved of one user from its own connection while requests run."""

    def __init__(self, user_id: str) -> None:
        super().__init__(daemon=True)
        self.user_id = user_id
        self.peak = Decimal(0)
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                user = GatewayUser.objects.get(pk=self.user_id)
                self.peak = max(self.peak, user.spend_usd + user.reserved_usd)
                self.samples += 1
                time.sleep(0.005)
        finally:
            connections.close_all()


async def _fire(urls: list[str], secret: str, n: int) -> list[httpx.Response]:
    body = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
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
def two_gateways(gateway, gateway_config_file):
    servers = [start_server_process(gateway_config_file) for _ in range(2)]
    yield [server.url for server in servers]
    for server in servers:
        server.kill()


@pytest.mark.parametrize("k", [1, 5])
def test_exactly_k_of_8k_concurrent_requests_fit_a_budget_of_k(gateway, two_gateways, k):
    set_price(MODEL, "10", "10")
    estimate = estimate_usd(prompt_chars=len(PROMPT), max_output_tokens=MAX_TOKENS, rates=RATES)
    limit = estimate * k
    user = make_user(budget=make_budget(max_budget_usd=limit))
    _, secret = make_key(user)
    sampler = PeakSampler(user.user_id)
    sampler.start()

    responses = asyncio.run(_fire(two_gateways, secret, 8 * k))

    sampler.stop.set()
    sampler.join()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * k + [403] * (7 * k)
    assert all(
        r.json()["error"]["code"] == "budget_exceeded" for r in responses if r.status_code == 403
    )
    assert gateway.fake.hits == k
    # Both processes served admitted requests... or refused them: each saw traffic.
    assert sampler.samples > 10
    assert sampler.peak <= limit
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == UsageLog.objects.aggregate(total=Sum("cost_usd"))["total"]
    assert user.spend_usd <= limit
    assert Hold.objects.filter(status=Hold.Status.SETTLED).count() == k
    assert UsageLog.objects.count() == 8 * k
    assert_books_balance(user)


def test_hold_of_a_killed_process_is_expired_by_the_sweeper(gateway, gateway_config_file):
    set_price("openai:gpt-4o-mini-hang")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    _, secret = make_key(user)
    server = start_server_process(gateway_config_file, OTARI_HOLD_TTL_SECONDS="1")

    def doomed_request() -> None:
        with contextlib.suppress(httpx.TransportError):
            httpx.post(
                f"{server.url}/v1/chat/completions",
                timeout=10,
                headers={"Authorization": f"Bearer {secret}"},
                json={
                    "model": "openai:gpt-4o-mini-hang",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )

    thread = threading.Thread(target=doomed_request)
    thread.start()
    assert gateway.fake.wait_for(lambda: gateway.fake.hits == 1, timeout=10)
    server.kill()
    thread.join()

    hold = Hold.objects.get()
    assert hold.status == Hold.Status.OPEN
    user.refresh_from_db()
    assert user.reserved_usd == hold.amount_usd > 0
    # Not yet expired: the sweeper leaves it alone.
    assert services.holds_expire_stale(now=hold.created_at) == 0

    time.sleep(1.1)
    assert services.holds_expire_stale() == 1
    hold.refresh_from_db()
    assert hold.status == Hold.Status.EXPIRED
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == 0
    assert not UsageLog.objects.exists()
    assert services.holds_expire_stale() == 0
