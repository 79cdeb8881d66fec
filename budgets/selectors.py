"""Reads. `caller_load` is the hot path's first statement: who is calling, what their
budget looks like, and the model's current price, in one round trip."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db.models import (
    Case,
    Count,
    DecimalField,
    Exists,
    ExpressionWrapper,
    F,
    Func,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce

from budgets import rules
from budgets.exceptions import UnknownUser
from budgets.models import (
    DEFAULT_ORGANIZATION_ID,
    DEFAULT_WORKSPACE_ID,
    APIKey,
    Budget,
    BudgetAlert,
    BudgetResetLog,
    Ceiling,
    GatewayUser,
    Hold,
    HoldCeiling,
    Workspace,
)
from common import pgpool
from common.fields import MoneyField
from usage.models import BUDGET_EXCEEDED, UsageLog
from usage.pricing import Rates
from usage.selectors import price_at, price_at_sql


@dataclass(frozen=True, slots=True)
class Caller:
    """A generation request's caller, as of the moment it was loaded."""

    user_id: str
    blocked: bool
    deleted: bool
    user_allowed_models: list[str] | None
    budget_id: str | None
    max_budget_usd: Decimal | None
    spend_usd: Decimal
    reserved_usd: Decimal
    next_budget_reset_at: datetime | None
    topup_usd: Decimal
    topup_expires_at: datetime | None
    # The key it came with; None when the master key named the user.
    api_key_id: uuid.UUID | None = None
    key_active: bool = True
    key_expires_at: datetime | None = None
    key_allowed_models: list[str] | None = None
    exclude_from_budget: bool = False
    # The model's price as of now; None when it has no price row.
    rates: Rates | None = None
    # Who set that price (ModelPricing.origin): "catalog" for a catalog default.
    price_origin: str | None = None
    # The budget's alert thresholds (percent of the limit); empty when the budget has
    # no alert target, so that settlement does no alert arithmetic at all.
    alert_thresholds_pct: tuple[int, ...] = ()
    # The key's workspace, else the default one (None only before it is provisioned).
    workspace_id: uuid.UUID | None = None
    # Rate limits per window (llm_proxy/ratelimit.py); None = unlimited.
    user_rpm_limit: int | None = None
    user_tpm_limit: int | None = None
    key_rpm_limit: int | None = None
    key_tpm_limit: int | None = None
    # The configuration's fingerprint (a key's caller on PostgreSQL, see
    # KEY_CALLER_FINGERPRINT_SQL); None when it cannot be reused.
    fingerprint: str | None = None

    @property
    def has_rate_limits(self) -> bool:
        """False for most callers, who then cost the rate limiter nothing at all."""
        return not (
            self.user_rpm_limit is None
            and self.user_tpm_limit is None
            and self.key_rpm_limit is None
            and self.key_tpm_limit is None
        )

    @property
    def allowed_models(self) -> list[str] | None:
        """The key's list when it has one, else the user's (keys inherit it)."""
        if self.key_allowed_models is not None:
            return self.key_allowed_models
        return self.user_allowed_models

    @property
    def scopes(self) -> rules.Scopes:
        """The ceilings' scopes this caller answers to (budgets.rules.Scopes): the
        organization's, the workspace's, and the key's (none for the master key)."""
        return rules.Scopes(
            organization_id=str(DEFAULT_ORGANIZATION_ID),
            workspace_id=str(self.workspace_id) if self.workspace_id else None,
            api_key_id=str(self.api_key_id) if self.api_key_id else None,
        )

    def limit_usd(self, now: datetime) -> Decimal | None:
        """The cap admission checks against (budgets.rules); None = uncapped."""
        return rules.limit_usd(self.max_budget_usd, self.topup_usd, self.topup_expires_at, now)


# What the caller load reads, in two parts: the configuration (who the caller is and what
# it may do, the budget's cap, the model's price) and the user's money, which changes on
# every request. The configuration's fingerprint lets a gateway process reuse a key's
# caller across requests: ADMIT recomputes it from the current rows and takes nothing
# when it differs (budgets.services.holds, ADMIT_CHECKED), so a change to any of these
# columns counts from the next request on. A column read here is configuration unless
# it is money.
_USER_CONFIG = f"""
    u.user_id, u.blocked, u.deleted_at, u.allowed_models AS user_allowed_models,
    u.budget_id, b.max_budget_usd, u.next_budget_reset_at,
    u.topup_usd, u.topup_expires_at,
    CASE WHEN {rules.ALERTS_ENABLED_SQL} THEN b.alert_thresholds_pct END
        AS alert_thresholds_pct,
    u.rpm_limit AS user_rpm_limit, u.tpm_limit AS user_tpm_limit,
    p.input_price_per_mtok_usd, p.output_price_per_mtok_usd,
    p.cache_read_price_per_mtok_usd, p.cache_write_price_per_mtok_usd, p.origin AS price_origin
"""
_KEY_CONFIG = """
    k.id AS api_key_id, k.is_active, k.expires_at AS key_expires_at,
    k.allowed_models AS key_allowed_models, k.exclude_from_budget,
    k.rpm_limit AS key_rpm_limit, k.tpm_limit AS key_tpm_limit,
    COALESCE(k.workspace_id, dw.id) AS workspace_id
"""
_CALLER_MONEY = "u.spend_usd, u.reserved_usd"
_PRICE_JOIN = f"""
    LEFT JOIN budgets_budget b ON b.budget_id = u.budget_id
    LEFT JOIN budgets_workspace dw ON dw.id = '{DEFAULT_WORKSPACE_ID}'
    LEFT JOIN LATERAL ({price_at_sql()}) p ON TRUE
"""
_KEY_CALLER_FROM = f"""
FROM budgets_apikey k
JOIN budgets_gatewayuser u ON u.user_id = k.user_id
{_PRICE_JOIN}
"""
# The configuration's fingerprint: a digest of its columns' text, as this statement and
# ADMIT_CHECKED both compute it on the same pool (one session time zone).
_KEY_CALLER_FINGERPRINT = "md5(ROW(cfg.*)::text)"
_CALLER_BY_KEY_SQL = f"""
SELECT cfg.*, {_KEY_CALLER_FINGERPRINT} AS fingerprint, m.*
FROM (SELECT {_USER_CONFIG}, {_KEY_CONFIG} {_KEY_CALLER_FROM}
      WHERE k.key_hash = %(key_hash)s) cfg
CROSS JOIN LATERAL (
    SELECT {_CALLER_MONEY} FROM budgets_gatewayuser u WHERE u.user_id = cfg.user_id
) m
"""
# For ADMIT_CHECKED: the fingerprint of the caller of the key %(key_hash)s now (the model
# %(model_key)s, prices in effect at %(now)s); no row when no key has that secret any
# more (deleted, or rotated: found by its hash, as the load finds it, not by its id).
KEY_CALLER_FINGERPRINT_SQL = f"""
SELECT {_KEY_CALLER_FINGERPRINT} FROM (
    SELECT {_USER_CONFIG}, {_KEY_CONFIG} {_KEY_CALLER_FROM}
    WHERE k.key_hash = %(key_hash)s
) cfg
"""
_CALLER_BY_USER_SQL = f"""
SELECT {_USER_CONFIG}, {_CALLER_MONEY}, dw.id AS workspace_id
FROM budgets_gatewayuser u
{_PRICE_JOIN}
WHERE u.user_id = %(user_id)s
"""


def _rates_from_row(row: dict[str, Any]) -> Rates | None:
    if row["input_price_per_mtok_usd"] is None:
        return None
    return Rates(
        input_per_mtok=row["input_price_per_mtok_usd"],
        output_per_mtok=row["output_price_per_mtok_usd"],
        cache_read_per_mtok=row["cache_read_price_per_mtok_usd"],
        cache_write_per_mtok=row["cache_write_price_per_mtok_usd"],
    )


def _json_list(value: Any) -> list[str] | None:
    # psycopg decodes jsonb; keep this tolerant of a text column all the same.
    return json.loads(value) if isinstance(value, str) else value


def _caller_from_row(row: dict[str, Any]) -> Caller:
    return Caller(
        user_id=row["user_id"],
        blocked=row["blocked"],
        deleted=row["deleted_at"] is not None,
        user_allowed_models=_json_list(row["user_allowed_models"]),
        budget_id=row["budget_id"],
        max_budget_usd=row["max_budget_usd"],
        spend_usd=row["spend_usd"],
        reserved_usd=row["reserved_usd"],
        next_budget_reset_at=row["next_budget_reset_at"],
        topup_usd=row["topup_usd"],
        topup_expires_at=row["topup_expires_at"],
        api_key_id=row.get("api_key_id"),
        key_active=row.get("is_active", True),
        key_expires_at=row.get("key_expires_at"),
        key_allowed_models=_json_list(row.get("key_allowed_models")),
        exclude_from_budget=row.get("exclude_from_budget", False),
        rates=_rates_from_row(row),
        price_origin=row["price_origin"],
        alert_thresholds_pct=tuple(_json_list(row.get("alert_thresholds_pct")) or ()),
        user_rpm_limit=row["user_rpm_limit"],
        user_tpm_limit=row["user_tpm_limit"],
        key_rpm_limit=row.get("key_rpm_limit"),
        key_tpm_limit=row.get("key_tpm_limit"),
        workspace_id=row["workspace_id"],
        fingerprint=row.get("fingerprint"),
    )


def _caller_load_orm(
    *, key_hash: str | None, user_id: str | None, model_key: str, now: datetime
) -> Caller | None:
    key: APIKey | None = None
    if key_hash is not None:
        key = APIKey.objects.filter(key_hash=key_hash).select_related("user__budget").first()
        if key is None:
            return None
        user = key.user
    else:
        user = GatewayUser.objects.filter(pk=user_id).select_related("budget").first()
        if user is None:
            return None
    price = price_at(model_key, now)
    row: dict[str, Any] = {
        "user_id": user.user_id,
        "blocked": user.blocked,
        "deleted_at": user.deleted_at,
        "user_allowed_models": user.allowed_models,
        "budget_id": user.budget_id,
        "max_budget_usd": user.budget.max_budget_usd if user.budget else None,
        "spend_usd": user.spend_usd,
        "reserved_usd": user.reserved_usd,
        "next_budget_reset_at": user.next_budget_reset_at,
        "topup_usd": user.topup_usd,
        "topup_expires_at": user.topup_expires_at,
        "alert_thresholds_pct": (
            user.budget.alert_thresholds_pct if user.budget and user.budget.alerts_enabled else None
        ),
        "user_rpm_limit": user.rpm_limit,
        "user_tpm_limit": user.tpm_limit,
        "input_price_per_mtok_usd": price.input_price_per_mtok_usd if price else None,
        "output_price_per_mtok_usd": price.output_price_per_mtok_usd if price else None,
        "cache_read_price_per_mtok_usd": price.cache_read_price_per_mtok_usd if price else None,
        "cache_write_price_per_mtok_usd": price.cache_write_price_per_mtok_usd if price else None,
        "price_origin": price.origin if price else None,
        "workspace_id": (
            Workspace.objects.filter(pk=DEFAULT_WORKSPACE_ID).values_list("pk", flat=True).first()
        ),
    }
    if key is not None and key.workspace_id is not None:
        row["workspace_id"] = key.workspace_id
    if key is not None:
        row.update(
            api_key_id=key.id,
            is_active=key.is_active,
            key_expires_at=key.expires_at,
            key_allowed_models=key.allowed_models,
            exclude_from_budget=key.exclude_from_budget,
            key_rpm_limit=key.rpm_limit,
            key_tpm_limit=key.tpm_limit,
        )
    return _caller_from_row(row)


async def caller_load(
    *, key_hash: str | None = None, user_id: str | None = None, model_key: str, now: datetime
) -> Caller | None:
    """The caller behind an API key hash (or a user id named by the master key), or None.

    Read without locks: admission re-checks the money under a lock, so a stale read here
    can only make a request fail the fast path and take the general one.
    """
    if pgpool.enabled():
        if key_hash is not None:
            sql, params = _CALLER_BY_KEY_SQL, {"key_hash": key_hash}
        else:
            sql, params = _CALLER_BY_USER_SQL, {"user_id": user_id}
        row = await pgpool.fetchone(sql, {**params, "model_key": model_key, "now": now})
        return _caller_from_row(row) if row else None
    return await sync_to_async(_caller_load_orm)(
        key_hash=key_hash, user_id=user_id, model_key=model_key, now=now
    )


_RATES_SQL = f"""
SELECT k.model_key, p.input_price_per_mtok_usd, p.output_price_per_mtok_usd,
       p.cache_read_price_per_mtok_usd, p.cache_write_price_per_mtok_usd
FROM unnest(%(model_keys)s::text[]) AS k(model_key)
JOIN LATERAL ({price_at_sql("k.model_key")}) p ON TRUE
"""


def _rates_current_orm(model_keys: list[str], now: datetime) -> dict[str, Rates]:
    rates = {}
    for model_key in set(model_keys):
        price = price_at(model_key, now)
        if price is not None:
            rates[model_key] = price.rates
    return rates


async def rates_current(*, model_keys: list[str], now: datetime) -> dict[str, Rates]:
    """The current rates of several `provider:model` keys (platform mode: one request's
    attempts), in one statement; keys without a price are absent."""
    if not model_keys:
        return {}
    if pgpool.enabled():
        rates = {}
        for row in await pgpool.fetchall(
            _RATES_SQL, {"model_keys": list(set(model_keys)), "now": now}
        ):
            rates[row["model_key"]] = _rates_from_row(row)
        return rates
    return await sync_to_async(_rates_current_orm)(model_keys, now)


# ---------------------------------------------------------------------------------------
# Operations: what the reset, sweep and audit commands look at (docs/SPEC.md §3.5, §3.6)


def user_lock(user_id: str) -> GatewayUser:
    """The user's row, locked until the transaction ends (call inside one), with its budget.

    no_key: only counters change, so inserts of holds and usage rows referencing this
    user (which take a key-share lock through the foreign key) are not blocked.
    of=self: the budget row joined for reading is not locked. Raises UnknownUser.
    """
    try:
        return (
            GatewayUser.objects.select_for_update(no_key=True, of=("self",))
            .select_related("budget")
            .get(pk=user_id)
        )
    except GatewayUser.DoesNotExist:
        raise UnknownUser from None


def ceiling_lock(ceiling_id: Any) -> Ceiling:
    """A ceiling's row, locked until the transaction ends, with its budget (as
    `user_lock`). Raises Ceiling.DoesNotExist."""
    return (
        Ceiling.objects.select_for_update(no_key=True, of=("self",))
        .select_related("budget")
        .get(pk=ceiling_id)
    )


def ceilings_lock(ids: Any) -> list[Ceiling]:
    """Ceilings' rows, locked in id order (the lock order of every statement that moves
    their money, budgets.services.holds), with their budgets."""
    return list(
        Ceiling.objects.select_for_update(no_key=True, of=("self",))
        .select_related("budget")
        .filter(pk__in=ids)
        .order_by("pk")
    )


def users_due_for_reset(
    *, now: datetime, user_id: str | None = None, budget_id: str | None = None
) -> QuerySet[GatewayUser]:
    """Users whose current window ended at or before `now`, in primary-key order."""
    users = GatewayUser.objects.filter(next_budget_reset_at__lte=now)
    if user_id is not None:
        users = users.filter(pk=user_id)
    if budget_id is not None:
        users = users.filter(budget_id=budget_id)
    return users.order_by("pk")


def holds_stale(*, now: datetime) -> QuerySet[Hold]:
    """Open holds past their expiry: what the sweeper releases."""
    return Hold.objects.filter(status=Hold.Status.OPEN, expires_at__lte=now)


_MONEY = DecimalField(max_digits=30, decimal_places=10)
_ZERO = Decimal("0")
# Stands in for "no window start": every usage row counts.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class BookDrift:
    """One account's books (a user's or a ceiling's) against the ledger they are derived
    from (§3.5 invariants 1, 2)."""

    kind: str  # "user" or "ceiling"
    account_id: str
    reserved_usd: Decimal
    open_holds_usd: Decimal
    spend_usd: Decimal
    window_usage_usd: Decimal

    @property
    def reserved_ok(self) -> bool:
        return self.reserved_usd == self.open_holds_usd

    @property
    def spend_ok(self) -> bool:
        return self.spend_usd == self.window_usage_usd

    @property
    def balanced(self) -> bool:
        return self.reserved_ok and self.spend_ok

    def __str__(self) -> str:
        return f"{self.kind} {self.account_id}"


def _window_start() -> Coalesce:
    """The outer account's window start; an account that never had a window (no budget
    ever) has every counted row in it."""
    return Coalesce(OuterRef("budget_started_at"), Value(_EPOCH))


def _total(rows: QuerySet, field: str) -> Coalesce:
    """The sum of `field` over `rows` (a subquery on the outer account), 0 when none."""
    summed = rows.order_by().annotate(total=Func(F(field), function="SUM")).values("total")
    return Coalesce(Subquery(summed, output_field=_MONEY), Value(_ZERO), output_field=_MONEY)


def _open_holds_of_outer_user() -> QuerySet:
    """The open holds of the user of the outer query, grouped by user (for subqueries)."""
    return (
        Hold.objects.filter(user=OuterRef("pk"), status=Hold.Status.OPEN).order_by().values("user")
    )


def window_last_charge_at(account: GatewayUser | Ceiling) -> datetime | None:
    """When the last usage row counted in the current window of a user or a ceiling
    was stamped (§3.5 invariant 2: counted rows stamped at or after the window start;
    a ceiling's are those of the holds it carried), or None."""
    start = account.budget_started_at or account.created_at
    rows = (
        UsageLog.objects.filter(user=account)
        if isinstance(account, GatewayUser)
        else UsageLog.objects.filter(
            id__in=HoldCeiling.objects.filter(ceiling=account).values("hold_id")
        )
    )
    return (
        rows.filter(counts_toward_budget=True, timestamp__gte=start)
        .order_by("-timestamp")
        .values_list("timestamp", flat=True)
        .first()
    )


def _window_usage_of_outer_user() -> QuerySet:
    """The usage rows that count in the current window of the outer query's user (§3.5
    invariant 2): counted rows stamped at or after the window start. Grouped by user."""
    return (
        UsageLog.objects.filter(
            user=OuterRef("pk"), counts_toward_budget=True, timestamp__gte=_window_start()
        )
        .order_by()
        .values("user")
    )


def _user_book_sums() -> tuple[Coalesce, Coalesce]:
    return (
        _total(_open_holds_of_outer_user(), "amount_usd"),
        _total(_window_usage_of_outer_user(), "cost_usd"),
    )


def _ceiling_book_sums() -> tuple[Coalesce, Coalesce]:
    """A ceiling's open holds (through their links), and the usage rows of the holds it
    carried that count in its current window."""
    links = HoldCeiling.objects.filter(ceiling=OuterRef(OuterRef("pk"))).values("hold_id")
    return (
        _total(
            Hold.objects.filter(ceiling_links__ceiling=OuterRef("pk"), status=Hold.Status.OPEN),
            "amount_usd",
        ),
        _total(
            UsageLog.objects.filter(
                id__in=links, counts_toward_budget=True, timestamp__gte=_window_start()
            ),
            "cost_usd",
        ),
    )


def _books(kind: str, accounts: QuerySet, sums: tuple[Coalesce, Coalesce]) -> list[BookDrift]:
    rows = accounts.order_by("pk").values_list("pk", "reserved_usd", "spend_usd", *sums)
    return [
        BookDrift(
            kind=kind,
            account_id=str(pk),
            reserved_usd=reserved,
            open_holds_usd=holds,
            spend_usd=spend,
            window_usage_usd=usage,
        )
        for pk, reserved, spend, holds, usage in rows
    ]


def books_for_users(*, user_id: str | None = None) -> list[BookDrift]:
    """Every user's (or one user's) books next to their ledger sums.

    One statement, so every user is read from one snapshot: a hold opened or a request
    settled meanwhile is seen entirely or not at all, never half.
    """
    users = GatewayUser.objects.all()
    if user_id is not None:
        users = users.filter(pk=user_id)
    return _books("user", users, _user_book_sums())


def books_for_ceilings(*, ceiling_id: Any = None) -> list[BookDrift]:
    """Every ceiling's (or one ceiling's) books next to their ledger sums, as users'."""
    ceilings = Ceiling.objects.all()
    if ceiling_id is not None:
        ceilings = ceilings.filter(pk=ceiling_id)
    return _books("ceiling", ceilings, _ceiling_book_sums())


def books_drift_list() -> list[BookDrift]:
    """The users and ceilings whose `reserved` or `spend` disagrees with their ledger."""
    books = books_for_users() + books_for_ceilings()
    return [book for book in books if not book.balanced]


# ---------------------------------------------------------------------------------------
# The management API's reads (budgets/api.py)


def _budgets_with_totals() -> QuerySet[Budget]:
    live = Q(users__deleted_at__isnull=True)
    return Budget.objects.annotate(
        user_count=Count("users", filter=live),
        total_spend=Coalesce(Sum("users__spend_usd", filter=live), Value(Decimal(0))),
        total_reserved=Coalesce(Sum("users__reserved_usd", filter=live), Value(Decimal(0))),
    )


def budget_list(*, skip: int, limit: int) -> list[Budget]:
    """Budgets, oldest first, with their live users' count and combined spend/reserved."""
    return list(_budgets_with_totals().order_by("created_at", "pk")[skip : skip + limit])


def budget_get(*, budget_id: str) -> Budget | None:
    return _budgets_with_totals().filter(pk=budget_id).first()


def budget_reset_log_list(*, budget_id: str, skip: int, limit: int) -> list[BudgetResetLog]:
    """A budget's period rolls, newest first (kept after the budget itself is deleted)."""
    return list(
        BudgetResetLog.objects.filter(budget_id=budget_id).order_by("-reset_at", "-pk")[
            skip : skip + limit
        ]
    )


def budget_reset_log_exists(*, budget_id: str) -> bool:
    return BudgetResetLog.objects.filter(budget_id=budget_id).exists()


def budget_alert_list(
    *, budget_id: str, skip: int, limit: int, user_id: str | None = None
) -> list[BudgetAlert]:
    """A budget's alerts, newest first (kept after the budget itself is deleted)."""
    alerts = BudgetAlert.objects.filter(budget_id=budget_id)
    if user_id is not None:
        alerts = alerts.filter(user_id=user_id)
    return list(alerts.order_by("-created_at", "-pk")[skip : skip + limit])


def budget_alert_exists(*, budget_id: str) -> bool:
    return BudgetAlert.objects.filter(budget_id=budget_id).exists()


def _users_with_counters() -> QuerySet[GatewayUser]:
    """Live users with the SDK's integer counters: requests and tokens of the current
    window (counted usage since `budget_started_at`, all of it when there is no window)
    and requests in flight (open holds). Tokens are never reserved here, so
    `reserved_tokens` is always 0."""
    window = _window_usage_of_outer_user()
    open_holds = _open_holds_of_outer_user()
    return GatewayUser.objects.filter(deleted_at__isnull=True).annotate(
        current_requests=Coalesce(Subquery(window.annotate(n=Count("*")).values("n")), Value(0)),
        current_tokens=Coalesce(
            Subquery(window.annotate(n=Sum("total_tokens")).values("n")), Value(0)
        ),
        reserved_requests=Coalesce(
            Subquery(open_holds.annotate(n=Count("*")).values("n")), Value(0)
        ),
        budget_refused_at=_last_refusal_in_window(),
    )


def user_list(*, skip: int, limit: int) -> list[GatewayUser]:
    """Live (not deleted) users, oldest first."""
    return list(_users_with_counters().order_by("created_at", "pk")[skip : skip + limit])


def user_get(*, user_id: str) -> GatewayUser | None:
    """A live user with its counters; None when unknown or deleted."""
    return _users_with_counters().filter(pk=user_id).first()


def user_exists(*, user_id: str, include_deleted: bool = False) -> bool:
    users = GatewayUser.objects.filter(pk=user_id)
    if not include_deleted:
        users = users.filter(deleted_at__isnull=True)
    return users.exists()


def api_key_list(
    *,
    skip: int,
    limit: int,
    user_id: str | None = None,
    workspace_id: uuid.UUID | None = None,
) -> list[APIKey]:
    """Keys, newest first; revoked keys too (with `is_active` false)."""
    keys = APIKey.objects.order_by("-created_at", "-pk")
    if user_id is not None:
        keys = keys.filter(user_id=user_id)
    if workspace_id is not None:
        in_workspace = Q(workspace_id=workspace_id)
        if workspace_id == DEFAULT_WORKSPACE_ID:
            # Keys issued before workspaces existed have none: they are the default's.
            in_workspace |= Q(workspace__isnull=True)
        keys = keys.filter(in_workspace)
    return list(keys[skip : skip + limit])


def api_key_get(*, key_id: uuid.UUID) -> APIKey | None:
    return APIKey.objects.filter(pk=key_id).first()


# ---------------------------------------------------------------------------------------
# Workspaces and ceilings (the management API's reads)


def workspace_list(*, skip: int, limit: int) -> tuple[list[Workspace], int]:
    """A page of the organization's workspaces, oldest first, and how many there are."""
    workspaces = Workspace.objects.order_by("created_at", "pk")
    return list(workspaces[skip : skip + limit]), workspaces.count()


def ceiling_list(
    *, skip: int, limit: int, scope_type: str | None = None, scope_id: str | None = None
) -> list[Ceiling]:
    """Ceilings, oldest first, with their budgets (one query for the page)."""
    ceilings = Ceiling.objects.select_related("budget").order_by("created_at", "pk")
    if scope_type is not None:
        ceilings = ceilings.filter(scope_type=scope_type)
    if scope_id is not None:
        ceilings = ceilings.filter(scope_id=scope_id)
    return list(ceilings[skip : skip + limit])


def ceiling_get(*, ceiling_id: uuid.UUID) -> Ceiling | None:
    return Ceiling.objects.select_related("budget").filter(pk=ceiling_id).first()


# ---------------------------------------------------------------------------------------
# The console's reads: users measured against their limits


def _refusals_in_window_of_outer_user() -> QuerySet:
    """The outer query's user's refusals for budget since its current window began (its
    creation, when it never had a window)."""
    return UsageLog.objects.filter(
        user=OuterRef("pk"),
        error_code=BUDGET_EXCEEDED,
        timestamp__gte=Coalesce(OuterRef("budget_started_at"), OuterRef("created_at")),
    )


def _last_refusal_in_window() -> Subquery:
    """When the outer query's user was last refused for budget in its current window:
    such a user is out of budget for the requests it makes, whatever share of the limit
    it has spent."""
    return Subquery(
        _refusals_in_window_of_outer_user().order_by("-timestamp").values("timestamp")[:1]
    )


def refused_in_window() -> Exists:
    """A condition on users: refused for budget in their current window."""
    return Exists(_refusals_in_window_of_outer_user())


def budget_refused_since(*, user_id: str, since: datetime) -> bool:
    return UsageLog.objects.filter(
        user_id=user_id, error_code=BUDGET_EXCEEDED, timestamp__gte=since
    ).exists()


def user_money_annotate(queryset: QuerySet[GatewayUser], *, now: datetime) -> QuerySet:
    """Annotate each user with `cap_usd` (the budget's max plus a live top-up; null when
    uncapped), `committed_usd` (spend + reserved) and `used_ratio` (committed / cap, 1
    for a zero cap), computed in SQL so lists can filter and sort on them.

    The same cap admission checks against (budgets.rules).
    """
    return queryset.annotate(
        cap_usd=rules.limit_expression(now),
        committed_usd=ExpressionWrapper(
            F("spend_usd") + F("reserved_usd"), output_field=MoneyField()
        ),
        budget_refused_at=_last_refusal_in_window(),
    ).annotate(
        used_ratio=Case(
            When(cap_usd__isnull=True, then=Value(None)),
            # A zero cap refuses every priced request: fully used.
            When(cap_usd__lte=0, then=Value(Decimal(1))),
            default=F("committed_usd") / F("cap_usd"),
            output_field=DecimalField(),
        )
    )


def users_near_budget(
    *, now: datetime, threshold: Decimal = Decimal("0.8")
) -> QuerySet[GatewayUser]:
    """Live users at or above `threshold` of their cap (spend + reserved), or refused for
    budget in their current window; refused first, then fullest first."""
    return (
        user_money_annotate(
            GatewayUser.objects.filter(deleted_at__isnull=True).select_related("budget"), now=now
        )
        .filter(
            Q(committed_usd__gte=F("cap_usd") * threshold) | Q(budget_refused_at__isnull=False),
            cap_usd__isnull=False,
        )
        .order_by(F("budget_refused_at").desc(nulls_last=True), "-used_ratio", "user_id")
    )


def users_refused_for_budget(*, now: datetime, hours: int = 24) -> QuerySet[GatewayUser]:
    """Live users refused for budget in the last `hours`, most recently refused first."""
    refusals = UsageLog.objects.filter(
        user=OuterRef("pk"),
        error_code=BUDGET_EXCEEDED,
        timestamp__gte=now - timedelta(hours=hours),
    )
    return (
        GatewayUser.objects.filter(deleted_at__isnull=True)
        .annotate(last_refused_at=Subquery(refusals.order_by("-timestamp").values("timestamp")[:1]))
        .filter(last_refused_at__isnull=False)
        .order_by("-last_refused_at", "user_id")
    )


@dataclass(frozen=True, slots=True)
class OpenHolds:
    count: int
    amount_usd: Decimal
    stale_count: int
    oldest_created_at: datetime | None


def holds_open_summary(*, now: datetime) -> OpenHolds:
    """Open holds in one aggregate: how many, how much, how many past expiry, oldest."""
    row = Hold.objects.filter(status=Hold.Status.OPEN).aggregate(
        count=Count("*"),
        amount=Sum("amount_usd"),
        stale=Count("request_id", filter=Q(expires_at__lte=now)),
        oldest=Min("created_at"),
    )
    return OpenHolds(
        count=row["count"],
        amount_usd=row["amount"] or Decimal(0),
        stale_count=row["stale"],
        oldest_created_at=row["oldest"],
    )


def users_reserved_total() -> Decimal:
    """The sum of all users' `reserved`: by invariant 1, the open holds' total (a gap
    between the two is drift for `audit_budgets`)."""
    return GatewayUser.objects.aggregate(total=Sum("reserved_usd"))["total"] or Decimal(0)
