"""Test helpers that move money through the real services, and an independent check of
the books (it does not use the audit code it is there to check)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from budgets.models import GatewayUser, Hold
from budgets.services import holds
from usage import ledger
from usage.models import UsageLog


def open_hold(user_id: str, amount: Decimal, now: datetime) -> ledger.UsageRecord:
    """Admit a request of `amount` (general path) and return the record that closes it."""
    request_id = uuid.uuid4()
    holds.hold_open(
        user_id=user_id,
        request_id=request_id,
        amount_usd=amount,
        model_key="openai:gpt-4o-mini",
        now=now,
    )
    return ledger.UsageRecord(
        request_id=request_id,
        user_id=user_id,
        api_key_id=None,
        endpoint="/v1/chat/completions",
        provider="openai",
        model="gpt-4o-mini",
        status="success",
        status_code=200,
        cost_usd=amount,
    )


def charge(user_id: str, amount: Decimal, now: datetime) -> None:
    """A request that cost `amount`: held, then settled."""
    holds.hold_settle(record=open_hold(user_id, amount, now), now=now)


def assert_books_balance(user_id: str) -> None:
    """§3.5: reserved = open holds; spend = counted usage settled in the current window."""
    user = GatewayUser.objects.get(pk=user_id)
    open_holds = sum(
        (h.amount_usd for h in Hold.objects.filter(user_id=user_id, status=Hold.Status.OPEN)),
        Decimal(0),
    )
    rows = UsageLog.objects.filter(user_id=user_id, counts_toward_budget=True)
    if user.budget_started_at is not None:
        rows = rows.filter(timestamp__gte=user.budget_started_at)
    window_usage = sum((row.cost_usd or Decimal(0) for row in rows), Decimal(0))
    assert (user.reserved_usd, user.spend_usd) == (open_holds, window_usage)
