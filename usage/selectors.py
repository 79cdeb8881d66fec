"""Reads of the usage app."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce, TruncDate

from budgets.models import GatewayUser
from otari.fields import MoneyField
from usage.models import ModelPricing, UsageLog

ZERO = Decimal("0")


def prices_current(now: datetime) -> list[ModelPricing]:
    """The price in effect now for every model that has one, by model key."""
    current: dict[str, ModelPricing] = {}
    for price in ModelPricing.objects.filter(effective_at__lte=now).order_by(
        "model_key", "-effective_at"
    ):
        current.setdefault(price.model_key, price)
    return list(current.values())


# ---------------------------------------------------------------------------------------
# The spend dashboard. Each function is one aggregate query, whatever the number of rows.
# "Spend" is the cost of usage, including keys excluded from budgets: what the providers
# will bill.


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: date
    spend_usd: Decimal
    requests: int
    errors: int


@dataclass(frozen=True, slots=True)
class SpendShare:
    """One user's or model's spend over a window."""

    key: str
    label: str
    spend_usd: Decimal
    requests: int


def _window_start(now: datetime, days: int) -> datetime:
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


def _spend() -> Coalesce:
    return Coalesce(Sum("cost_usd"), ZERO, output_field=MoneyField())


def spend_by_day(*, now: datetime, days: int = 30) -> list[DaySpend]:
    """Spend, requests and errors per UTC day for the last `days` days (today included),
    oldest first, with zero rows for days without traffic."""
    start = _window_start(now, days)
    totals = {
        row["day"]: row
        for row in UsageLog.objects.filter(timestamp__gte=start)
        .annotate(day=TruncDate("timestamp", tzinfo=UTC))
        .values("day")
        .annotate(
            spend=_spend(),
            requests=Count("*"),
            errors=Count("id", filter=Q(status=UsageLog.Status.ERROR)),
        )
        .order_by()
    }
    out = []
    for offset in range(days):
        day = (start + timedelta(days=offset)).date()
        row = totals.get(day)
        out.append(
            DaySpend(
                day=day,
                spend_usd=row["spend"] if row else ZERO,
                requests=row["requests"] if row else 0,
                errors=row["errors"] if row else 0,
            )
        )
    return out


def spend_top_users(*, now: datetime, days: int = 30, limit: int = 8) -> list[SpendShare]:
    """The users who spent most over the last `days` days."""
    rows = list(
        UsageLog.objects.filter(timestamp__gte=_window_start(now, days))
        .values("user_id")
        .annotate(spend=_spend(), requests=Count("*"))
        .order_by("-spend", "user_id")[:limit]
    )
    # Aliases for the few winners only: joining users to every row of the window doubled
    # the query's time on a million-row log.
    aliases = dict(
        GatewayUser.objects.filter(pk__in=[row["user_id"] for row in rows]).values_list(
            "user_id", "alias"
        )
    )
    return [
        SpendShare(
            key=row["user_id"],
            label=aliases.get(row["user_id"]) or row["user_id"],
            spend_usd=row["spend"],
            requests=row["requests"],
        )
        for row in rows
    ]


def spend_top_models(*, now: datetime, days: int = 30, limit: int = 8) -> list[SpendShare]:
    """The models (per provider instance) that cost most over the last `days` days."""
    rows = (
        UsageLog.objects.filter(timestamp__gte=_window_start(now, days))
        .values("provider", "model")
        .annotate(spend=_spend(), requests=Count("*"))
        .order_by("-spend", "provider", "model")[:limit]
    )
    return [
        SpendShare(
            key=row["model"],
            label=f"{row['provider']}:{row['model']}" if row["provider"] else row["model"],
            spend_usd=row["spend"],
            requests=row["requests"],
        )
        for row in rows
    ]


def usage_recent_errors(*, limit: int = 10) -> list[UsageLog]:
    """The newest failed requests (read through a partial index on error rows)."""
    return list(
        UsageLog.objects.filter(status=UsageLog.Status.ERROR)
        .only(
            "id",
            "timestamp",
            "user_id",
            "provider",
            "model",
            "endpoint",
            "status",
            "status_code",
            "error_message",
        )
        .order_by("-timestamp")[:limit]
    )
