"""Ceilings (budgets at the key, workspace and organization scopes) through HTTP into the
gateway, on PostgreSQL: one admission takes every hold or none, and every close, roll and
audit treats a ceiling as it treats a user."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import httpx
import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.utils import timezone

from budgets.models import Ceiling, CeilingResetLog, Hold, HoldCeiling
from budgets.rules import Scopes
from budgets.selectors import books_drift_list
from budgets.services import holds, tenancy
from budgets.services.periods import budgets_roll_due
from tests.conftest import MASTER_KEY, start_server_process
from tests.factories import (
    make_budget,
    make_ceiling,
    make_key,
    make_user,
    make_workspace,
    set_price,
)
from usage.ledger import UsageRecord
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, estimate_usd

pytestmark = [pytest.mark.postgres]

MODEL = "openai:gpt-4o-mini"
RATES = Rates(input_per_mtok=Decimal("10"), output_per_mtok=Decimal("10"))
PROMPT = "Say hello to the test suite"
MAX_TOKENS = 100
# What admission holds for one request of this shape.
ESTIMATE = estimate_usd(prompt_chars=len(PROMPT), max_output_tokens=MAX_TOKENS, rates=RATES)


def chat(gateway, secret: str, model: str = MODEL) -> httpx.Response:
    return gateway.chat(
        secret,
        model=model,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}],
    )


def assert_nothing_held(*ceilings: Ceiling) -> None:
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    for ceiling in ceilings:
        ceiling.refresh_from_db()
        assert ceiling.reserved_usd == 0
    assert books_drift_list() == []


@pytest.fixture
def priced():
    set_price(MODEL, "10", "10")
    set_price("anthropic:claude-3-5-haiku", "10", "10")


def test_a_key_ceiling_stops_one_key_while_the_users_other_keys_go_on(gateway, priced):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    capped, capped_secret = make_key(user, key_name="ci")
    _, other_secret = make_key(user, key_name="laptop")
    # Room for one request's hold, not two.
    ceiling = make_ceiling(capped, make_budget(max_budget_usd=ESTIMATE * Decimal("1.1")))

    first = chat(gateway, capped_secret)
    assert first.status_code == 200
    cost = Decimal(first.headers["X-Otari-Cost-Usd"])
    ceiling.refresh_from_db()
    assert (ceiling.spend_usd, ceiling.reserved_usd) == (cost, 0)

    refused = chat(gateway, capped_secret)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["message"].startswith("API key budget exceeded: $")
    request_id = refused.headers["X-Otari-Request-Id"]
    row = UsageLog.objects.get(pk=request_id)
    assert (row.status, row.error_code, row.api_key_id) == ("error", "budget_exceeded", capped.pk)
    assert row.workspace_id == tenancy.default_workspace_ensure().pk

    assert chat(gateway, other_secret).status_code == 200
    ceiling.refresh_from_db()
    # The other key's request is not the capped key's: the ceiling did not move.
    assert ceiling.spend_usd == cost
    assert gateway.fake.hits == 2
    assert_nothing_held(ceiling)


def test_refusals_name_their_level_and_leave_no_hold_at_any(gateway, priced):
    workspace = make_workspace("research")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, secret = make_key(user, workspace=workspace)
    roomy, tight = (
        make_budget(max_budget_usd=Decimal("50")),
        make_budget(max_budget_usd=ESTIMATE / 2),
    )
    key_ceiling = make_ceiling(key, roomy)
    workspace_ceiling = make_ceiling(workspace, tight)

    refused = chat(gateway, secret)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("Workspace budget exceeded: $")
    assert not HoldCeiling.objects.exists()
    assert_nothing_held(key_ceiling, workspace_ceiling)

    # Now the key's ceiling is the one that does not fit, and the workspace's would.
    Ceiling.objects.filter(pk=key_ceiling.pk).update(budget=tight)
    Ceiling.objects.filter(pk=workspace_ceiling.pk).update(budget=roomy)
    refused = chat(gateway, secret)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("API key budget exceeded: $")
    assert_nothing_held(key_ceiling, workspace_ceiling)

    # Both ceilings fit and the user's own budget does not: the user's level is named.
    Ceiling.objects.filter(pk=key_ceiling.pk).update(budget=roomy)
    user.budget.max_budget_usd = ESTIMATE / 2
    user.budget.save()
    refused = chat(gateway, secret)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("Budget exceeded: $")
    assert_nothing_held(key_ceiling, workspace_ceiling)

    # Everything fits: one hold, on both ceilings, closed with the request.
    user.budget.max_budget_usd = Decimal("100")
    user.budget.save()
    served = chat(gateway, secret)
    assert served.status_code == 200
    cost = Decimal(served.headers["X-Otari-Cost-Usd"])
    request_id = served.headers["X-Otari-Request-Id"]
    assert set(
        HoldCeiling.objects.filter(hold_id=request_id).values_list("ceiling_id", flat=True)
    ) == {
        key_ceiling.pk,
        workspace_ceiling.pk,
    }
    for ceiling in (key_ceiling, workspace_ceiling):
        ceiling.refresh_from_db()
        assert (ceiling.spend_usd, ceiling.lifetime_spend_usd) == (cost, cost)
    assert UsageLog.objects.get(pk=request_id).workspace_id == workspace.pk
    assert UsageLog.objects.filter(error_code="budget_exceeded").count() == 3
    assert_nothing_held(key_ceiling, workspace_ceiling)


def test_a_ceiling_narrowed_to_one_provider_caps_only_that_provider(gateway, priced):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    _, secret = make_key(user)
    organization = tenancy.organization_ensure()
    at_anthropic = make_ceiling(
        organization, make_budget(max_budget_usd=ESTIMATE / 2), provider="anthropic"
    )
    everywhere = make_ceiling(organization, make_budget(max_budget_usd=Decimal("50")))

    served = chat(gateway, secret)
    assert served.status_code == 200
    refused = chat(gateway, secret, model="anthropic:claude-3-5-haiku")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("Organization budget exceeded: $")

    at_anthropic.refresh_from_db()
    everywhere.refresh_from_db()
    assert at_anthropic.spend_usd == 0
    assert everywhere.spend_usd == Decimal(served.headers["X-Otari-Cost-Usd"])
    assert_nothing_held(at_anthropic, everywhere)


def test_a_master_key_request_answers_to_the_default_workspace(gateway, settings, priced):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    default = tenancy.default_workspace_ensure()
    ceiling = make_ceiling(default, make_budget(max_budget_usd=ESTIMATE / 2))

    refused = gateway.post(
        "/v1/chat/completions",
        MASTER_KEY,
        {
            "model": MODEL,
            "user": user.user_id,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}],
        },
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("Workspace budget exceeded")
    row = UsageLog.objects.get(pk=refused.headers["X-Otari-Request-Id"])
    assert (row.workspace_id, row.api_key_id) == (default.pk, None)
    assert_nothing_held(ceiling)


def test_a_ceiling_whose_period_ended_rolls_before_the_request_is_judged(
    gateway, priced, time_machine
):
    time_machine.move_to(timezone.now(), tick=True)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, secret = make_key(user)
    ceiling = make_ceiling(
        key, make_budget(max_budget_usd=ESTIMATE * Decimal("1.1"), budget_duration_sec=3600)
    )
    assert chat(gateway, secret).status_code == 200
    assert chat(gateway, secret).status_code == 403

    time_machine.shift(timedelta(hours=1, seconds=1))
    served = chat(gateway, secret)
    assert served.status_code == 200
    ceiling.refresh_from_db()
    log = CeilingResetLog.objects.get(ceiling=ceiling)
    assert log.previous_spend_usd > 0
    assert ceiling.budget_started_at == log.reset_at
    assert ceiling.spend_usd == Decimal(served.headers["X-Otari-Cost-Usd"])
    assert_nothing_held(ceiling)


def test_a_client_that_leaves_mid_stream_is_charged_what_it_was_sent_on_every_level(gateway):
    model = "openai:gpt-4o-mini-chunks-40-delay-50"
    set_price(model, "10", "10")
    workspace = make_workspace()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, secret = make_key(user, workspace=workspace)
    ceilings = [
        make_ceiling(key, make_budget(max_budget_usd=Decimal("10"))),
        make_ceiling(workspace, make_budget(max_budget_usd=Decimal("10"))),
        make_ceiling(tenancy.organization_ensure(), make_budget(max_budget_usd=Decimal("10"))),
    ]
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    with (
        gateway.client(secret) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        chunks = 0
        for line in response.iter_lines():
            chunks += '"content":"' in line
            if chunks >= 5:
                break
    assert gateway.fake.wait_for(
        lambda: UsageLog.objects.filter(status="client_disconnected").exists(), timeout=5
    )
    row = UsageLog.objects.get()
    assert row.cost_usd > 0
    user.refresh_from_db()
    assert user.spend_usd == row.cost_usd
    for ceiling in ceilings:
        ceiling.refresh_from_db()
        assert (ceiling.spend_usd, ceiling.reserved_usd) == (row.cost_usd, 0)
    assert_nothing_held(*ceilings)


# ---------------------------------------------------------------------------------------
# Holds open across rolls, expiry and the audit: the services the request path uses.


def _hold(user, key, request_id, amount: Decimal, now) -> None:
    holds.hold_open(
        user_id=user.user_id,
        request_id=request_id,
        amount_usd=amount,
        model_key=MODEL,
        scopes=Scopes(None, None, str(key.pk)),
        provider="openai",
        now=now,
    )


def _settle(user, key, request_id, cost: Decimal, now) -> None:
    record = UsageRecord(
        request_id=request_id,
        user_id=user.user_id,
        api_key_id=key.pk,
        endpoint="/v1/chat/completions",
        provider="openai",
        model="gpt-4o-mini",
        status="success",
        status_code=200,
        usage=TokenUsage(input_tokens=10, output_tokens=10),
        cost_usd=cost,
    )
    holds.hold_settle(record=record, now=now)


def test_a_hold_open_across_a_ceilings_reset_settles_into_the_new_window(
    transactional_db, time_machine
):
    start = timezone.now().replace(microsecond=0)
    time_machine.move_to(start, tick=False)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, _ = make_key(user)
    ceiling = make_ceiling(
        key, make_budget(max_budget_usd=Decimal("10"), reset_alignment="calendar_day")
    )
    done, open_across = uuid.uuid4(), uuid.uuid4()
    _hold(user, key, done, Decimal("2"), start)
    _settle(user, key, done, Decimal("1.5"), start)
    _hold(user, key, open_across, Decimal("3"), start)

    tomorrow = ceiling.next_budget_reset_at + timedelta(seconds=5)
    time_machine.move_to(tomorrow, tick=False)
    summary = budgets_roll_due(now=tomorrow)
    assert [log.ceiling_id for log in summary.rolled_ceilings] == [ceiling.pk]
    ceiling.refresh_from_db()
    # The roll keeps what is held and closes the window's spend into its log.
    assert (ceiling.spend_usd, ceiling.reserved_usd) == (0, Decimal("3"))
    assert summary.rolled_ceilings[0].previous_spend_usd == Decimal("1.5")
    assert books_drift_list() == []

    _settle(user, key, open_across, Decimal("2.25"), tomorrow)
    ceiling.refresh_from_db()
    assert (ceiling.spend_usd, ceiling.reserved_usd) == (Decimal("2.25"), 0)
    assert ceiling.lifetime_spend_usd == Decimal("3.75")
    assert books_drift_list() == []


def test_the_sweeper_releases_an_expired_hold_on_its_ceilings(transactional_db):
    now = timezone.now()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, _ = make_key(user)
    ceiling = make_ceiling(key, make_budget(max_budget_usd=Decimal("10")))
    request_id = uuid.uuid4()
    _hold(user, key, request_id, Decimal("4"), now)
    ceiling.refresh_from_db()
    assert ceiling.reserved_usd == Decimal("4")

    expired = holds.holds_expire_stale(now=now + timedelta(days=1))
    assert expired == 1
    ceiling.refresh_from_db()
    assert ceiling.reserved_usd == 0
    # A request that finishes after its hold expired is still charged, ceilings too.
    _settle(user, key, request_id, Decimal("0.5"), now + timedelta(days=1))
    ceiling.refresh_from_db()
    assert (ceiling.spend_usd, ceiling.reserved_usd) == (Decimal("0.5"), 0)
    assert books_drift_list() == []


@pytest.mark.books_unbalanced(reason="corrupts a ceiling on purpose, then repairs it")
def test_the_audit_finds_a_corrupted_ceiling_and_repairs_it(gateway, priced):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
    key, secret = make_key(user)
    ceiling = make_ceiling(key, make_budget(max_budget_usd=Decimal("10")))
    served = chat(gateway, secret)
    cost = Decimal(served.headers["X-Otari-Cost-Usd"])
    Ceiling.objects.filter(pk=ceiling.pk).update(
        spend_usd=Decimal("7.000001"), reserved_usd=Decimal("0.5")
    )

    with pytest.raises(CommandError) as refused:
        call_command("audit_budgets", stdout=(stdout := StringIO()))
    assert refused.value.returncode == 2
    out = stdout.getvalue()
    assert f"ceiling {ceiling.pk}: reserved $0.5 != open holds $0; spend $7.000001" in out
    assert "0 user(s) and 1 ceiling(s) out of balance" in out

    call_command("audit_budgets", "--fix", stdout=StringIO())
    ceiling.refresh_from_db()
    assert (ceiling.spend_usd, ceiling.reserved_usd) == (cost, 0)
    assert books_drift_list() == []


# ---------------------------------------------------------------------------------------
# Concurrency: one workspace ceiling, two users' keys, two gateway processes.

SLOW = "openai:gpt-4o-mini-slow-1500-chunks-5"
GENERAL_PATH = {"OTARI_MONEY_FAST_PATH": "false"}


class CeilingPeak(threading.Thread):
    """Polls a ceiling's spend + reserved from its own connection while requests run."""

    def __init__(self, ceiling_id) -> None:
        super().__init__(daemon=True)
        self.ceiling_id = ceiling_id
        self.peak = Decimal(0)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                ceiling = Ceiling.objects.get(pk=self.ceiling_id)
                self.peak = max(self.peak, ceiling.spend_usd + ceiling.reserved_usd)
                time.sleep(0.005)
        finally:
            connections.close_all()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fast", "general"])
def test_a_workspace_ceiling_shared_by_two_users_admits_exactly_what_fits(
    gateway, gateway_config_file, path
):
    set_price(SLOW, "10", "10")
    workspace = make_workspace("shared")
    secrets = []
    for _ in range(2):
        user = make_user(budget=make_budget(max_budget_usd=Decimal("100")))
        _, secret = make_key(user, workspace=workspace)
        secrets.append(secret)
    k = 3
    ceiling = make_ceiling(workspace, make_budget(max_budget_usd=ESTIMATE * k))
    env = GENERAL_PATH if path == "general" else {}
    servers = [start_server_process(gateway_config_file, **env) for _ in range(2)]
    sampler = CeilingPeak(ceiling.pk)
    sampler.start()

    async def fire() -> list[httpx.Response]:
        body = {
            "model": SLOW,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}],
        }
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{servers[i % 2].url}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {secrets[(i // 2) % 2]}"},
                    )
                    for i in range(12)
                )
            )

    try:
        responses = asyncio.run(fire())
    finally:
        sampler.stop.set()
        sampler.join()
        for server in servers:
            server.kill()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * k + [403] * (12 - k)
    for response in responses:
        if response.status_code == 403:
            assert response.json()["error"]["message"].startswith("Workspace budget exceeded")
    assert sampler.peak <= ceiling.budget.max_budget_usd
    ceiling.refresh_from_db()
    served = UsageLog.objects.filter(status="success")
    assert ceiling.spend_usd == sum((row.cost_usd for row in served), Decimal(0))
    assert ceiling.reserved_usd == 0
    assert UsageLog.objects.filter(workspace=workspace).count() == 12
    assert_nothing_held(ceiling)
