"""Reads of the usage app: current prices, and the usage log for the management API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.db import OperationalError, connections, transaction
from django.db.models import (
    CharField,
    Count,
    F,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    UUIDField,
    Value,
)
from django.db.models.functions import Coalesce, Concat, TruncDate, TruncDay, TruncHour

from common.fields import MoneyField
from usage.models import (
    ModelPricing,
    UsageLog,
    UsageReport,
    api_key_model,
    budget_model,
    user_model,
    workspace_model,
)

ZERO = Decimal(0)


# ---------------------------------------------------------------------------------------
# The current price: of a model's price versions, the newest one already in effect (a
# version may be scheduled ahead). Written here once in each spelling the code needs;
# tests/budgets/test_money_rules.py checks that they agree.


def _price_versions_in_effect(moment: datetime, model_key: Any) -> QuerySet[ModelPricing]:
    """`model_key`'s versions in effect at `moment`, newest first (`model_key` may be an
    OuterRef)."""
    return ModelPricing.objects.filter(model_key=model_key, effective_at__lte=moment).order_by(
        "-effective_at"
    )


def price_at(model_key: str, moment: datetime) -> ModelPricing | None:
    """The price version in effect for `model_key` at `moment`."""
    return _price_versions_in_effect(moment, model_key).first()


def price_current_effective_at(moment: datetime) -> Subquery:
    """For a ModelPricing queryset: when the version in effect for its row's model began."""
    return Subquery(
        _price_versions_in_effect(moment, OuterRef("model_key")).values("effective_at")[:1]
    )


def price_at_sql(model_key: str = "%(model_key)s") -> str:
    """The price version in effect at `%(now)s` for the SQL expression `model_key`, as a
    subquery (for a LATERAL join)."""
    return (
        f"SELECT * FROM usage_modelpricing WHERE model_key = {model_key}"
        " AND effective_at <= %(now)s ORDER BY effective_at DESC LIMIT 1"
    )


def prices_current(now: datetime) -> list[ModelPricing]:
    """The price in effect now for every model that has one, by model key."""
    return list(_prices_current(now))


def _prices_current(now: datetime) -> QuerySet[ModelPricing]:
    return ModelPricing.objects.filter(effective_at=price_current_effective_at(now)).order_by(
        "model_key"
    )


def pricing_list_current(*, now: datetime, skip: int, limit: int) -> list[ModelPricing]:
    """One row per model, the version in effect at `now`, by model key (paginated in SQL)."""
    return list(_prices_current(now)[skip : skip + limit])


def pricing_history(*, model_key: str) -> list[ModelPricing]:
    """Every version of a model's price, newest `effective_at` first (scheduled ones too)."""
    return list(ModelPricing.objects.filter(model_key=model_key).order_by("-effective_at"))


# ---------------------------------------------------------------------------------------
# The usage log


@dataclass(frozen=True)
class UsageFilters:
    """What a usage query may be narrowed by. Lists match any of their values; the time
    range is half-open, `start <= timestamp < end`."""

    start: datetime | None = None
    end: datetime | None = None
    user_ids: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    api_key_ids: list[uuid.UUID] = field(default_factory=list)
    endpoint: str | None = None
    status: str | None = None
    provider: str | None = None
    status_code: int | None = None
    counts_toward_budget: bool | None = None


def _usage_filtered(filters: UsageFilters) -> QuerySet[UsageLog]:
    rows = UsageLog.objects.all()
    if filters.start is not None:
        rows = rows.filter(timestamp__gte=filters.start)
    if filters.end is not None:
        rows = rows.filter(timestamp__lt=filters.end)
    if filters.user_ids:
        rows = rows.filter(user_id__in=filters.user_ids)
    if filters.models:
        rows = rows.filter(model__in=filters.models)
    if filters.api_key_ids:
        rows = rows.filter(api_key_id__in=filters.api_key_ids)
    if filters.endpoint is not None:
        rows = rows.filter(endpoint=filters.endpoint)
    if filters.status is not None:
        rows = rows.filter(status=filters.status)
    if filters.provider is not None:
        rows = rows.filter(provider=filters.provider)
    if filters.status_code is not None:
        rows = rows.filter(status_code=filters.status_code)
    if filters.counts_toward_budget is not None:
        rows = rows.filter(counts_toward_budget=filters.counts_toward_budget)
    return rows


def usage_list(*, filters: UsageFilters, skip: int, limit: int) -> list[UsageLog]:
    """A page of usage rows, newest first (id breaks ties, so pages never overlap), with
    the user's alias and the key's name."""
    rows = (
        _usage_filtered(filters)
        .annotate(user_alias=F("user__alias"), api_key_name=F("api_key__key_name"))
        .order_by("-timestamp", "-id")
    )
    return list(rows[skip : skip + limit])


def usage_count(*, filters: UsageFilters) -> int:
    return _usage_filtered(filters).count()


# ---------------------------------------------------------------------------------------
# Summary: totals, breakdowns and a time series over one window

Bucket = Literal["day", "hour"]
DIMENSIONS = ("user", "model", "provider", "endpoint", "api_key", "status_code")
# A breakdown lists its biggest groups (by cost, then requests); the rest fold into one
# row with `is_other` true, so a summary stays small however many users there are.
GROUP_LIMIT = 100


def _sum(column: str) -> Coalesce:
    return Coalesce(Sum(column), Value(0))


def _cost() -> Coalesce:
    # The money column's own type, so that every backend returns its ten places.
    return Coalesce(Sum("cost_usd"), Value(ZERO), output_field=MoneyField())


def _error_class(status_code: int | None) -> str:
    if status_code is None:
        return "unknown"
    if status_code == 402:
        return "pricing"
    if status_code == 429:
        return "rate_limit"
    if status_code in (401, 403):
        return "auth"
    if status_code >= 500:
        return "provider_error"
    return "client_error"


def _labels(dimension: str, keys: list[Any]) -> dict[Any, str]:
    """Display names: a user's alias, a key's name."""
    present = [key for key in keys if key is not None]
    if dimension == "user":
        return dict(user_model().objects.filter(pk__in=present).values_list("user_id", "alias"))
    if dimension == "api_key":
        return {
            str(key): name
            for key, name in api_key_model()
            .objects.filter(pk__in=present)
            .values_list("id", "key_name")
        }
    return {}


_METERS = ("requests", "tokens", "cost")


def _rollup(groups: list[dict[str, Any]], column: str) -> dict[Any, dict[str, Any]]:
    """Add up fine-grained groups by one of their columns."""
    out: dict[Any, dict[str, Any]] = {}
    for group in groups:
        key = group[column]
        key = None if key is None else str(key)
        into = out.setdefault(key, {"requests": 0, "tokens": 0, "cost": ZERO})
        into["requests"] += group["requests"]
        into["tokens"] += group["total_tokens"]
        into["cost"] += group["cost"]
    return out


def _breakdown(
    rolled: dict[Any, dict[str, Any]], dimension: str, totals: dict[str, Any]
) -> list[dict[str, Any]]:
    """The biggest groups (by cost, then requests), the rest folded into one row."""
    ranked = sorted(
        rolled.items(),
        key=lambda item: (-item[1]["cost"], -item[1]["requests"], item[0] is None, item[0] or ""),
    )
    shown = ranked[:GROUP_LIMIT]
    labels = _labels(dimension, [key for key, _ in shown])
    out = [
        {"key": key, "label": labels.get(key) or None, **meters, "is_other": False}
        for key, meters in shown
    ]
    if len(ranked) > GROUP_LIMIT:
        out.append(
            {
                "key": None,
                "label": "other",
                "requests": totals["request_count"] - sum(m["requests"] for _, m in shown),
                "tokens": totals["total_tokens"] - sum(m["tokens"] for _, m in shown),
                "cost": totals["cost"] - sum((m["cost"] for _, m in shown), ZERO),
                "is_other": True,
            }
        )
    return out


def usage_summary(
    *,
    filters: UsageFilters,
    bucket: Bucket = "day",
    dimensions: tuple[str, ...] = DIMENSIONS,
) -> dict[str, Any]:
    """Totals over the window, the breakdowns asked for, and a series per day or hour.

    Three scans of the window, not one per breakdown: a GROUP BY of the low-cardinality
    columns (model, provider, endpoint, status, status code) from which the totals and
    those breakdowns are added up here, one of (user, key) for the other two, and one
    per time bucket. Every aggregation costs a pass over the window's rows, so this is
    what keeps a 30-day summary of a large log fast (scripts/bench_usage_api.py). The
    time bucket has a query of its own because PostgreSQL cannot estimate how many
    groups an expression makes and, grouped with the other columns, it chooses a sort
    that spills to disk. Money is summed as Decimal, in SQL and here: exact.
    """
    rows = _usage_filtered(filters)
    fine = list(
        rows.values("model", "provider", "endpoint", "status", "status_code")
        .annotate(
            requests=Count("id"),
            unpriced=Count("id", filter=Q(cost_usd__isnull=True)),
            latency_sum=_sum("latency_ms"),
            latency_count=Count("latency_ms"),
            **_series_meters(),
        )
        .order_by()
    )
    error = UsageLog.Status.ERROR
    totals: dict[str, Any] = {
        "request_count": sum(g["requests"] for g in fine),
        "error_count": sum(g["requests"] for g in fine if g["status"] == error),
        "unpriced_requests": sum(g["unpriced"] for g in fine),
        "cost": sum((g["cost"] for g in fine), ZERO),
        "cache_write_1h_tokens": 0,
    }
    for meter in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    ):
        totals[meter] = sum(g[meter] for g in fine)
    latency_count = sum(g["latency_count"] for g in fine)
    totals["avg_latency_ms"] = (
        round(sum(g["latency_sum"] for g in fine) / latency_count, 1) if latency_count else None
    )
    totals["billed_input_tokens"] = totals["prompt_tokens"]
    totals["billed_output_tokens"] = totals["completion_tokens"]

    summary: dict[str, Any] = {"totals": totals, "bucket": bucket}
    for dimension in ("model", "provider", "endpoint"):
        summary[f"by_{dimension}"] = (
            _breakdown(_rollup(fine, dimension), dimension, totals)
            if dimension in dimensions
            else []
        )
    if "user" in dimensions or "api_key" in dimensions:
        owners = list(
            rows.values("user_id", "api_key_id")
            .annotate(requests=Count("id"), total_tokens=_sum("total_tokens"), cost=_cost())
            .order_by()
        )
    for dimension, column in (("user", "user_id"), ("api_key", "api_key_id")):
        summary[f"by_{dimension}"] = (
            _breakdown(_rollup(owners, column), dimension, totals)
            if dimension in dimensions
            else []
        )
    summary["by_source"] = (
        [
            {
                "key": "gateway",
                "label": None,
                "requests": totals["request_count"],
                "tokens": totals["total_tokens"],
                "cost": totals["cost"],
                "is_other": False,
            }
        ]
        if totals["request_count"]
        else []
    )
    summary["by_source_label"] = []
    errors: dict[int | None, int] = {}
    for group in fine:
        if group["status"] == error:
            errors[group["status_code"]] = errors.get(group["status_code"], 0) + group["requests"]
    summary["errors_by_status_code"] = (
        [
            {"status_code": code, "error_class": _error_class(code), "requests": count}
            for code, count in sorted(
                errors.items(), key=lambda item: (-item[1], item[0] is None, item[0] or 0)
            )
        ]
        if "status_code" in dimensions
        else []
    )
    trunc = TruncDay if bucket == "day" else TruncHour
    summary["series"] = [
        {
            "bucket_start": point["bucket_start"].astimezone(UTC).isoformat(),
            "requests": point["requests"],
            "errors": point["errors"],
            "tokens": point["total_tokens"],
            "input_tokens": point["prompt_tokens"],
            "output_tokens": point["completion_tokens"],
            "cache_read_tokens": point["cache_read_tokens"],
            "cache_write_tokens": point["cache_write_tokens"],
            "cost": point["cost"],
        }
        for point in rows.annotate(bucket_start=trunc("timestamp", tzinfo=UTC))
        .values("bucket_start")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status=UsageLog.Status.ERROR)),
            **_series_meters(),
        )
        .order_by("bucket_start")
    ]
    return summary


def _series_meters() -> dict[str, Any]:
    return {
        "prompt_tokens": _sum("prompt_tokens"),
        "completion_tokens": _sum("completion_tokens"),
        "total_tokens": _sum("total_tokens"),
        "cache_read_tokens": _sum("cache_read_tokens"),
        "cache_write_tokens": _sum("cache_write_tokens"),
        "cost": _cost(),
    }


USAGE_CSV_HEADER = [
    "date",
    "user_id",
    "model",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
]


def usage_summary_rows(*, filters: UsageFilters) -> Iterator[tuple[Any, ...]]:
    """Totals per UTC day, user and model, in that order, for the CSV export; read from
    the database in chunks."""
    groups = (
        _usage_filtered(filters)
        .annotate(day=TruncDay("timestamp", tzinfo=UTC))
        .values("day", "user_id", "model")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status=UsageLog.Status.ERROR)),
            prompt_tokens=_sum("prompt_tokens"),
            completion_tokens=_sum("completion_tokens"),
            total_tokens=_sum("total_tokens"),
            cost=_cost(),
        )
        .order_by("day", "user_id", "model")
    )
    for group in groups.iterator(chunk_size=2000):
        yield (
            group["day"].date().isoformat(),
            group["user_id"],
            group["model"],
            group["requests"],
            group["errors"],
            group["prompt_tokens"],
            group["completion_tokens"],
            group["total_tokens"],
            group["cost"],
        )


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


def spend_by_day(*, now: datetime, days: int = 30, user_id: str | None = None) -> list[DaySpend]:
    """Spend, requests and errors per UTC day for the last `days` days (today included),
    oldest first, with zero rows for days without traffic; of one user when given."""
    start = _window_start(now, days)
    rows = UsageLog.objects.filter(timestamp__gte=start)
    if user_id is not None:
        rows = rows.filter(user_id=user_id)
    totals = {
        row["day"]: row
        for row in rows.annotate(day=TruncDate("timestamp", tzinfo=UTC))
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
        user_model()
        .objects.filter(pk__in=[row["user_id"] for row in rows])
        .values_list("user_id", "alias")
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


def month_window(now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month `now` is in: its first instant and the next month's."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def spend_per_workspace(
    *,
    start: datetime,
    end: datetime,
    default_workspace_id: uuid.UUID,
    workspace_ids: list[uuid.UUID] | None = None,
) -> list[SpendShare]:
    """Spend and requests per workspace over [start, end), most spent first (of the
    workspaces in `workspace_ids` only, when given): one GROUP BY on the (workspace, time)
    index. Rows written before workspaces existed (no workspace) count in the default
    workspace, as a key without one does. Spend is what the dashboard calls spend: the
    cost of every row, keys excluded from budgets included."""
    rows = UsageLog.objects.filter(timestamp__gte=start, timestamp__lt=end)
    if workspace_ids is not None:
        wanted = Q(workspace_id__in=workspace_ids)
        if default_workspace_id in workspace_ids:
            wanted |= Q(workspace_id__isnull=True)
        rows = rows.filter(wanted)
    workspace = Coalesce("workspace_id", Value(default_workspace_id, output_field=UUIDField()))
    names = workspace_model().objects.filter(pk=OuterRef("workspace_key")).values("name")
    groups = (
        rows.annotate(workspace_key=workspace)
        .values("workspace_key")
        .annotate(spend=_spend(), requests=Count("*"))
        # Named in the same statement: a few groups, each one lookup by primary key.
        .annotate(name=Subquery(names))
        .order_by()
    )
    shares = [
        SpendShare(
            key=str(g["workspace_key"]),
            label=g["name"] or str(g["workspace_key"]),
            spend_usd=g["spend"],
            requests=g["requests"],
        )
        for g in groups
    ]
    return sorted(shares, key=lambda s: (-s.spend_usd, s.label))


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


def usage_reports_dead(*, status_code: int | None = None) -> QuerySet[UsageReport]:
    """Dead-lettered platform usage reports, newest first; those whose last answer had
    `status_code`, when given."""
    dead = UsageReport.objects.filter(delivery_status=UsageReport.Delivery.DEAD)
    if status_code is not None:
        dead = dead.filter(last_status_code=status_code)
    return dead.order_by("-created_at")


def usage_reports_outbox_counts() -> tuple[int, int]:
    """Platform usage reports not yet delivered, and given up on (dead letters). Two
    counts rather than one aggregate: each is answered from its partial index."""
    reports = UsageReport.objects
    return (
        reports.filter(delivery_status=UsageReport.Delivery.PENDING).count(),
        reports.filter(delivery_status=UsageReport.Delivery.DEAD).count(),
    )


# ---------------------------------------------------------------------------------------
# The console's usage log: totals over a filter, and filter suggestions


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


class TotalsTooSlow(Exception):
    """The totals did not finish within their time limit."""


def usage_totals(rows: QuerySet[UsageLog], *, timeout_ms: int | None = None) -> UsageTotals:
    """Totals over every row of `rows` (a filtered queryset, not a page): one aggregate.

    On PostgreSQL, `timeout_ms` bounds the query (SET LOCAL statement_timeout, so it
    applies to this transaction only) and raises TotalsTooSlow when it is exceeded.
    """
    aggregate = {
        "requests": Count("pk"),
        "failed": Count("pk", filter=~Q(status=UsageLog.Status.SUCCESS)),
        "prompt_tokens": _sum("prompt_tokens"),
        "completion_tokens": _sum("completion_tokens"),
        "cost_usd": _cost(),
    }
    rows = rows.order_by()
    if timeout_ms is None or connections[rows.db].vendor != "postgresql":
        return UsageTotals(**rows.aggregate(**aggregate))
    try:
        with transaction.atomic(using=rows.db), connections[rows.db].cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = %s", [int(timeout_ms)])
            return UsageTotals(**rows.aggregate(**aggregate))
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == "57014":  # query_canceled
            raise TotalsTooSlow from exc
        raise


@dataclass(frozen=True)
class Suggestion:
    value: str
    label: str


SUGGESTIONS = 20


def suggest_users(term: str) -> list[Suggestion]:
    """Users whose id starts with, or whose alias contains, `term` (the users table, never
    the usage log)."""
    users = user_model().objects.all()
    if term:
        users = users.filter(Q(user_id__istartswith=term) | Q(alias__icontains=term))
    return [
        Suggestion(value=uid, label=f"{alias} ({uid})" if alias else uid)
        for uid, alias in users.order_by("user_id").values_list("user_id", "alias")[:SUGGESTIONS]
    ]


def suggest_models(term: str) -> list[Suggestion]:
    """Priced models (`provider:model`) containing `term`: the prices table is small and
    names every model the gateway serves with a price."""
    keys = ModelPricing.objects.order_by("model_key").values_list("model_key", flat=True)
    if term:
        keys = keys.filter(model_key__icontains=term)
    return [Suggestion(value=k, label=k) for k in keys.distinct()[:SUGGESTIONS]]


def suggest_keys(term: str) -> list[Suggestion]:
    """Keys whose shown prefix starts with, or whose name or user contains, `term`."""
    keys = api_key_model().objects.all()
    if term:
        keys = keys.filter(
            Q(key_prefix__istartswith=term)
            | Q(key_name__icontains=term)
            | Q(user__user_id__istartswith=term)
        )
    rows = keys.order_by("-created_at").values_list("key_prefix", "key_name", "user_id")
    return [
        Suggestion(value=prefix, label=f"{prefix}… {name or ''} ({user})")
        for prefix, name, user in rows[:SUGGESTIONS]
    ]


def providers_known() -> list[str]:
    """The providers named by prices, for the provider filter (no scan of the usage log)."""
    keys = ModelPricing.objects.values_list("model_key", flat=True)
    return sorted({k.partition(":")[0] for k in keys if ":" in k})


# ---------------------------------------------------------------------------------------
# Spend reports (the console's "Spend reports" page)

REPORT_DIMENSIONS = ("user", "model", "budget")


@dataclass(frozen=True)
class ReportRow:
    key: str
    label: str
    requests: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


def spend_report(*, by: str, start: datetime, end: datetime) -> list[ReportRow]:
    """Spend per user, model or budget over [start, end), most spent first: one GROUP BY
    over the window's rows. "Budget" is the budget each user is on now (usage rows do
    not record the budget they were charged under)."""
    column = {"user": "user_id", "model": "model_key", "budget": "user__budget_id"}[by]
    rows = UsageLog.objects.filter(timestamp__gte=start, timestamp__lt=end)
    if by == "model":
        rows = rows.annotate(
            model_key=Concat("provider", Value(":"), "model", output_field=CharField())
        )
    groups = list(
        rows.values(column)
        .annotate(
            requests=Count("pk"),
            failed=Count("pk", filter=~Q(status=UsageLog.Status.SUCCESS)),
            prompt_tokens=_sum("prompt_tokens"),
            completion_tokens=_sum("completion_tokens"),
            cost_usd=_cost(),
        )
        .order_by("-cost_usd", "-requests", column)
    )
    labels: dict[Any, str] = {}
    if by == "user":
        ids = [g[column] for g in groups]
        labels = dict(user_model().objects.filter(pk__in=ids).values_list("user_id", "alias"))
    elif by == "budget":
        ids = [g[column] for g in groups if g[column]]
        labels = {b.pk: str(b) for b in budget_model().objects.filter(pk__in=ids)}
    out = []
    for g in groups:
        key = g[column] or ""
        label = labels.get(key) or ("no budget" if by == "budget" and not key else key)
        label = label.removeprefix(":")
        out.append(
            ReportRow(
                key=key,
                label=label,
                requests=g["requests"],
                failed=g["failed"],
                prompt_tokens=g["prompt_tokens"],
                completion_tokens=g["completion_tokens"],
                cost_usd=g["cost_usd"],
            )
        )
    return out
