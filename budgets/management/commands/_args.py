"""Argument types shared by the budgets commands (a leading underscore: not a command)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.utils.dateparse import parse_datetime


def iso_datetime(value: str) -> datetime:
    """An ISO 8601 date-time; one without a zone is UTC (docs/SPEC.md §3.1: time is UTC)."""
    parsed = parse_datetime(value.strip())
    if parsed is None:
        raise argparse.ArgumentTypeError(
            "expected an ISO 8601 date-time such as 2025-01-31T00:00:00Z"
        )
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def usd_amount(value: str) -> Decimal:
    """A USD amount between 0 and the largest the books hold, exact (never a float)."""
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError("expected an amount in USD, such as 25 or 12.50") from None
    if not amount.is_finite() or not 0 <= amount <= settings.MONEY_MAX_USD:
        raise argparse.ArgumentTypeError(
            f"the amount must be between 0 and {settings.MONEY_MAX_USD:,}"
        )
    if amount != amount.quantize(Decimal("0.000001")):
        raise argparse.ArgumentTypeError("the amount has more than 6 decimal places")
    return amount
