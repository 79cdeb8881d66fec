"""A month of realistic history for console tests and screenshots, written through the
budget services with past clocks (so spend, holds, period resets and usage rows agree
exactly as if the gateway had served every request).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings

from budgets.exceptions import BudgetExceeded
from budgets.models import Budget, GatewayUser
from budgets.services import accounts, holds, keys
from tests.factories import set_price
from usage import ledger
from usage.pricing import Rates, TokenUsage, cost_usd

# (provider, model, input $/Mtok, output $/Mtok, weight)
MODELS = [
    ("openai", "gpt-4o-mini", "0.15", "0.60", 6),
    ("openai", "gpt-4o", "2.50", "10.00", 3),
    ("anthropic", "claude-sonnet-4", "3.00", "15.00", 3),
    ("anthropic", "claude-haiku-3.5", "0.80", "4.00", 2),
]
# (user id, alias, budget name, requests per day, typical output tokens)
USERS = [
    ("ana", "Ana Lima", "Research", 5, 1800),
    ("ben", "Ben Okafor", "Research", 3, 1200),
    ("chen", "Chen Wei", "Product", 4, 1400),
    ("dara", "Dara Singh", "Product", 2, 800),
    ("eli", "Eli Novak", "Interns", 3, 1000),
    ("fay", "Fay Duarte", "Interns", 1, 600),
    ("ci-bot", "CI pipeline", "Automation", 7, 500),
]


@dataclass(frozen=True)
class Demo:
    budgets: dict[str, Budget]
    users: dict[str, GatewayUser]
    requests: int


def seed_demo_history(*, now: datetime, days: int = 30, seed: int = 7) -> Demo:
    """Budgets, users, keys and `days` days of traffic ending at `now`.

    Interns share a small budget that fills up (refused requests become error rows, and
    Eli ends over budget when a top-up expires); a few provider failures are refunded;
    two holds are left open, one of them stale.
    """
    rng = random.Random(seed)
    start = now - timedelta(days=days)
    rates = {}
    for provider, model, inp, out, _ in MODELS:
        set_price(f"{provider}:{model}", inp, out, effective_at=start - timedelta(days=1))
        rates[(provider, model)] = Rates(input_per_mtok=Decimal(inp), output_per_mtok=Decimal(out))
    budgets = {
        "Research": accounts.budget_create(
            name="Research", max_budget_usd=Decimal("3.50"), reset_alignment="calendar_month"
        ),
        "Product": accounts.budget_create(
            name="Product", max_budget_usd=Decimal("1"), budget_duration_sec=7 * 86400
        ),
        # Rolling and longer than the history, so that where `now` falls in a month does
        # not change who is over budget.
        "Interns": accounts.budget_create(
            name="Interns", max_budget_usd=Decimal("0.50"), budget_duration_sec=45 * 86400
        ),
        "Automation": accounts.budget_create(name="Automation", max_budget_usd=None),
        "Contractors": accounts.budget_create(
            name="Contractors", max_budget_usd=Decimal("1"), budget_duration_sec=45 * 86400
        ),
    }
    users = {}
    laptop_keys = {}
    for user_id, alias, budget_name, _, _ in USERS:
        users[user_id] = accounts.user_create(
            user_id=user_id, alias=alias, budget=budgets[budget_name], now=start
        )
        laptop_keys[user_id], _ = keys.api_key_create(user=users[user_id], key_name="laptop")
    # Eli had a top-up that ran out two days ago: spent beyond the budget while it lasted,
    # Eli is now over it.
    accounts.user_topup_set(
        user_id="eli", amount_usd=Decimal("1.50"), expires_at=now - timedelta(days=2)
    )

    events = []
    for day in range(days):
        for user_id, _, _, per_day, typical_out in USERS:
            # Weekdays are busier; traffic grows over the month.
            weekday = (start + timedelta(days=day)).weekday()
            volume = per_day * (0.4 if weekday >= 5 else 1.0) * (0.6 + 0.8 * day / days)
            for _ in range(rng.randint(0, round(volume * 2))):
                at = start + timedelta(days=day, seconds=rng.randint(0, 86399))
                events.append((at, user_id, typical_out))
    events.sort()
    served = 0
    weights = [m[4] for m in MODELS]
    for at, user_id, typical_out in events:
        if at >= now - timedelta(minutes=5):
            continue
        provider, model, *_ = rng.choices(MODELS, weights=weights)[0]
        usage = TokenUsage(
            input_tokens=rng.randint(2_000, 40_000), output_tokens=rng.randint(50, typical_out * 2)
        )
        served += _one_request(
            user_id=user_id,
            key_id=laptop_keys[user_id].id,
            provider=provider,
            model=model,
            usage=usage,
            rates=rates[(provider, model)],
            at=at,
            fail=rng.random() < 0.03,
        )
    # Gus works steadily towards his limit without reaching it: 85% on any day.
    users["gus"] = accounts.user_create(
        user_id="gus", alias="Gus Moreau", budget=budgets["Contractors"], now=start
    )
    gus_key, _ = keys.api_key_create(user=users["gus"], key_name="laptop")
    for day in range(17):
        served += _one_request(
            user_id="gus",
            key_id=gus_key.id,
            provider="openai",
            model="gpt-4o",
            usage=TokenUsage(input_tokens=20_000, output_tokens=0),
            rates=rates[("openai", "gpt-4o")],
            at=now - timedelta(days=17 - day, hours=3),
            fail=False,
        )
    ttl = timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS)
    # On the uncapped user, so that they open whatever the others have left.
    for user_id, opened_at in (("ci-bot", now - timedelta(seconds=20)), ("ci-bot", now - 2 * ttl)):
        holds.hold_open(
            user_id=user_id,
            request_id=uuid.uuid4(),
            amount_usd=Decimal("0.042"),
            model_key="openai:gpt-4o",
            now=opened_at,
        )
    return Demo(
        budgets=budgets,
        users={u: GatewayUser.objects.get(pk=u) for u in users},
        requests=served,
    )


def _one_request(
    *,
    user_id: str,
    key_id: uuid.UUID,
    provider: str,
    model: str,
    usage: TokenUsage,
    rates: Rates,
    at: datetime,
    fail: bool,
) -> int:
    request_id = uuid.uuid4()
    cost = cost_usd(usage, rates)
    record = {
        "request_id": request_id,
        "user_id": user_id,
        "api_key_id": key_id,
        "endpoint": "/v1/chat/completions",
        "provider": provider,
        "model": model,
    }
    try:
        holds.hold_open(
            user_id=user_id,
            request_id=request_id,
            amount_usd=cost * Decimal("1.5"),
            model_key=f"{provider}:{model}",
            now=at,
        )
    except BudgetExceeded:
        holds.usage_record(
            record=ledger.UsageRecord(
                **record,
                status="error",
                status_code=403,
                error_message="Budget exceeded",
                error_code="budget_exceeded",
                latency_ms=3,
            ),
            now=at,
        )
        return 1
    done = at + timedelta(milliseconds=400 + usage.output_tokens * 12)
    if fail:
        holds.hold_refund(
            record=ledger.UsageRecord(
                **record,
                status="error",
                status_code=502,
                error_message="LLM provider error",
                latency_ms=30_000,
            ),
            now=done,
        )
        return 1
    holds.hold_settle(
        record=ledger.UsageRecord(
            **record,
            status="success",
            status_code=200,
            usage=usage,
            cost_usd=cost,
            latency_ms=int((done - at).total_seconds() * 1000),
        ),
        now=done,
    )
    return 1
