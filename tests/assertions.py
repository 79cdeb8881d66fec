"""Assertions about the books, shared by the money tests."""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum

from budgets.models import GatewayUser, Hold
from usage.models import UsageLog


def assert_books_balance(user: GatewayUser) -> None:
    """docs/SPEC.md §3.5 invariants 1 and 2 for one user: reserved = open holds, spend =
    counted usage cost settled in the current window."""
    user.refresh_from_db()
    open_holds = Hold.objects.filter(user=user, status=Hold.Status.OPEN).aggregate(
        total=Sum("amount_usd")
    )["total"] or Decimal(0)
    assert user.reserved_usd == open_holds, (user.reserved_usd, open_holds)
    rows = UsageLog.objects.filter(user=user, counts_toward_budget=True)
    if user.budget_started_at is not None:
        rows = rows.filter(timestamp__gte=user.budget_started_at)
    spent = rows.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
    assert user.spend_usd == spent, (user.spend_usd, spent)


def assert_untouched(user: GatewayUser, *, spend: Decimal = Decimal(0)) -> None:
    """Nothing charged, nothing left reserved, no hold left open."""
    user.refresh_from_db()
    assert user.spend_usd == spend
    assert user.reserved_usd == 0
    assert not Hold.objects.filter(user=user, status=Hold.Status.OPEN).exists()
