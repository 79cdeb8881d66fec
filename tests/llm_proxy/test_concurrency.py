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

from budgets.models import APIKey, GatewayUser, Hold
from budgets.services import holds
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


# The money steps' two paths (budgets/services/holds.py): the statement alone, or row locks
# and then the same statement in a transaction.
GENERAL_PATH = {"OTARI_MONEY_FAST_PATH": "false"}


@pytest.fixture(params=["fast", "general"])
def two_gateways(request, gateway, gateway_config_file):
    env = GENERAL_PATH if request.param == "general" else {}
    servers = [start_server_process(gateway_config_file, **env) for _ in range(2)]
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
    assert holds.holds_expire_stale(now=hold.created_at) == 0

    time.sleep(1.1)
    assert holds.holds_expire_stale() == 1
    hold.refresh_from_db()
    assert hold.status == Hold.Status.EXPIRED
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == 0
    assert not UsageLog.objects.exists()
    assert holds.holds_expire_stale() == 0


def test_fast_and_general_path_settles_of_one_key_race_for_30_s_without_deadlock(
    gateway, gateway_config_file
):
    """One key's requests settle on both paths at once, in two processes, for 30 s, while
    its last_used_at is kept due, so that every settle also wants the key's row. Before
    the money core was one, the general path waited for the key's row while holding the
    user's, and the fast path the other way round: a deadlock, a 5xx and a lost charge."""
    model = "openai:gpt-4o-mini"
    set_price(model, "10", "10")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1000")))
    key, secret = make_key(user)
    servers = [
        start_server_process(gateway_config_file),
        start_server_process(gateway_config_file, **GENERAL_PATH),
    ]
    stop = threading.Event()

    def keep_touch_due() -> None:
        try:
            while not stop.is_set():
                APIKey.objects.filter(pk=key.pk).update(last_used_at=None)
                time.sleep(0.005)
        finally:
            connections.close_all()

    async def hammer(url: str, deadline: float) -> list[int]:
        statuses = []
        body = {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(timeout=30) as client:
            while time.monotonic() < deadline:
                response = await client.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {secret}"},
                )
                statuses.append(response.status_code)
        return statuses

    async def race() -> list[int]:
        deadline = time.monotonic() + 30
        per_server = 4
        results = await asyncio.gather(
            *(hammer(server.url, deadline) for server in servers for _ in range(per_server))
        )
        return [status for statuses in results for status in statuses]

    toucher = threading.Thread(target=keep_touch_due, daemon=True)
    toucher.start()
    try:
        statuses = asyncio.run(race())
    finally:
        stop.set()
        toucher.join()
        for server in servers:
            server.kill()

    assert len(statuses) > 200
    assert set(statuses) == {200}
    assert UsageLog.objects.filter(user=user).count() == len(statuses)
    assert Hold.objects.filter(user=user, status=Hold.Status.SETTLED).count() == len(statuses)
    assert not Hold.objects.filter(user=user).exclude(status=Hold.Status.SETTLED).exists()
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == UsageLog.objects.filter(user=user).aggregate(t=Sum("cost_usd"))["t"]
    assert_books_balance(user)
