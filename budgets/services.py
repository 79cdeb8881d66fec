"""The budget service: holds, settlement, periods, users, keys (CONTRACT §1, §3).

Invariants kept here, and checked by `manage.py audit_budgets` and the tests:

1. `reserved` is the sum of the user's open holds.
2. `spend` is the sum of the costs of the user's counted usage rows settled since
   `budget_started_at`.
3. No admission makes `spend + reserved` exceed the limit, however many requests race,
   in however many processes.
4. Every hold is closed exactly once: open -> settled | refunded | expired, by
   compare-and-swap on its status; a second close is a no-op. (A request that finishes
   after the sweeper expired its hold still has its cost charged: expired -> settled.)

How: every change of `spend`/`reserved` happens in a transaction that holds the user's
row lock (`select_for_update`) or in one conditional UPDATE, and always in the same lock
order, hold before user. Nothing is read, compared in Python and written back unlocked.

Two ways to run the request's steps. The general path (`hold_open`, `hold_settle`, ...)
is the ORM under `transaction.atomic`, and covers every case: period rolls, expired holds,
precise refusal reasons, SQLite. On PostgreSQL the common case takes a fast path first:
one statement per step sent from the event loop (`_HOLD_OPEN_SQL`, ...), with the same
conditions written in SQL. When a statement's conditions do not hold (period due, over
budget, hold not open) it changes nothing, and the caller falls back to the general path,
which then decides. Both paths are exercised by the same tests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from budgets import periods
from budgets.exceptions import BudgetExceeded, UnknownUser, UserBlocked
from budgets.models import APIKey, Budget, BudgetResetLog, GatewayUser, Hold, MasterKey
from otari import pgpool
from otari.exceptions import Conflict
from usage.models import UsageLog
from usage.pricing import TokenUsage

ZERO = Decimal("0")
# last_used_at is for people, not accounting: refreshing it at most once a minute keeps
# an UPDATE of a busy key's row off nearly every request.
_KEY_TOUCH_INTERVAL = timedelta(seconds=60)


# ---------------------------------------------------------------------------------------
# What the request path passes in and gets back


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A user's money after a step, for the X-Otari-Budget-* response headers."""

    spend_usd: Decimal
    reserved_usd: Decimal
    limit_usd: Decimal | None
    next_reset_at: datetime | None

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.limit_usd is None:
            return None
        return max(ZERO, self.limit_usd - self.spend_usd - self.reserved_usd)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """How a request ended: becomes its usage row, and its charge when it had a hold."""

    request_id: uuid.UUID
    user_id: str
    api_key_id: uuid.UUID | None
    endpoint: str
    provider: str
    model: str
    status: str
    status_code: int | None
    usage: TokenUsage | None = None
    cost_usd: Decimal | None = None
    counts_toward_budget: bool = True
    error_message: str = ""
    latency_ms: int | None = None

    @property
    def charge_usd(self) -> Decimal:
        """What this request adds to the user's spend."""
        if not self.counts_toward_budget or self.cost_usd is None:
            return ZERO
        return self.cost_usd

    def usage_row_params(self, now: datetime) -> dict[str, Any]:
        u = self.usage
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "api_key_id": self.api_key_id,
            "now": now,
            "endpoint": self.endpoint,
            "provider": self.provider,
            "model": self.model,
            "prompt_tokens": u.prompt_tokens if u else None,
            "completion_tokens": u.output_tokens if u else None,
            "total_tokens": u.total_tokens if u else None,
            "cache_read_tokens": u.cache_read_tokens if u else None,
            "cache_write_tokens": u.cache_write_tokens if u else None,
            "cost_usd": self.cost_usd,
            "charge_usd": self.charge_usd,
            "status": self.status,
            "status_code": self.status_code,
            "error_message": self.error_message,
            "latency_ms": self.latency_ms,
            "counts_toward_budget": self.counts_toward_budget,
            "touch_before": now - _KEY_TOUCH_INTERVAL,
        }


def _limit_usd(user: GatewayUser, now: datetime) -> Decimal | None:
    """The user's cap: the budget's max plus a live top-up; None when uncapped."""
    budget = user.budget
    if budget is None or budget.max_budget_usd is None:
        return None
    if user.topup_expires_at is not None and user.topup_expires_at > now:
        return budget.max_budget_usd + user.topup_usd
    return budget.max_budget_usd


def _state(user: GatewayUser, now: datetime) -> BudgetState:
    return BudgetState(
        spend_usd=user.spend_usd,
        reserved_usd=user.reserved_usd,
        limit_usd=_limit_usd(user, now),
        next_reset_at=user.next_budget_reset_at,
    )


def _lock_user(user_id: str) -> GatewayUser:
    # no_key: only counters change, so inserts of holds and usage rows referencing this
    # user (which take a key-share lock through the foreign key) are not blocked.
    # of=self: the budget row joined for reading is not locked.
    return (
        GatewayUser.objects.select_for_update(no_key=True, of=("self",))
        .select_related("budget")
        .get(pk=user_id)
    )


# ---------------------------------------------------------------------------------------
# Periods (§3.6)


def _period_roll_locked(user: GatewayUser, now: datetime) -> BudgetResetLog | None:
    """Start the user's current window if the previous one has ended.

    Must be called while holding the user's row lock (see `_lock_user`). Sets spend to 0
    and moves the window; never touches `reserved`: open holds settle into the new period.
    """
    due = user.next_budget_reset_at
    if due is None or due > now:
        return None
    budget = user.budget
    if budget is None or not budget.has_period:
        # The period was removed since this window began: nothing resets any more.
        GatewayUser.objects.filter(pk=user.pk).update(next_budget_reset_at=None)
        user.next_budget_reset_at = None
        return None
    start, next_reset = periods.window_after(
        due, now, duration_sec=budget.budget_duration_sec, alignment=budget.reset_alignment
    )
    # Compare-and-swap on the window end: of two processes rolling the same period, one
    # changes the row; the other changes nothing and writes no log.
    rolled = GatewayUser.objects.filter(pk=user.pk, next_budget_reset_at=due).update(
        spend_usd=ZERO, budget_started_at=start, next_budget_reset_at=next_reset
    )
    if not rolled:
        return None
    log = BudgetResetLog.objects.create(
        user=user,
        budget=budget,
        previous_spend_usd=user.spend_usd,
        reset_at=start,
        next_reset_at=next_reset,
    )
    user.spend_usd, user.budget_started_at, user.next_budget_reset_at = ZERO, start, next_reset
    return log


def user_period_roll(*, user_id: str, now: datetime | None = None) -> BudgetResetLog | None:
    """Roll the user's period if it is due; safe to call from any number of processes."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            return None
        return _period_roll_locked(user, now)


def user_period_reset(*, user_id: str, now: datetime | None = None) -> BudgetResetLog:
    """Start a fresh window now, whether or not the current one has ended (an operator's
    "reset budget period now").

    Spend goes to 0 and is kept in the reset-log row; `reserved` is never touched, so
    open holds settle into the new window. The next reset follows the budget's period
    from now (a calendar budget still resets on its next boundary). Raises UnknownUser.
    """
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        # Under the row lock: a second reset at the same instant (a double-submitted
        # form) finds the first one's log instead of violating its uniqueness.
        existing = BudgetResetLog.objects.filter(user=user, reset_at=now).first()
        if existing is not None:
            return existing
        budget = user.budget
        if budget is not None and budget.has_period:
            start, next_reset = periods.fresh_window(
                now, duration_sec=budget.budget_duration_sec, alignment=budget.reset_alignment
            )
        else:
            start, next_reset = now, None
        log = BudgetResetLog.objects.create(
            user=user,
            budget=budget,
            previous_spend_usd=user.spend_usd,
            reset_at=start,
            next_reset_at=next_reset,
        )
        GatewayUser.objects.filter(pk=user.pk).update(
            spend_usd=ZERO, budget_started_at=start, next_budget_reset_at=next_reset, updated_at=now
        )
        return log


def _start_fresh_window(user: GatewayUser, budget: Budget | None, now: datetime) -> None:
    """A new or re-assigned budget starts a fresh window: spend 0 from now.

    Must be called while holding the user's row lock. The spend of the window that ends
    is kept in a reset-log row, so nothing disappears from the books.
    """
    if budget is None or not budget.has_period:
        start, next_reset = now, None
    else:
        start, next_reset = periods.fresh_window(
            now, duration_sec=budget.budget_duration_sec, alignment=budget.reset_alignment
        )
    if user.spend_usd or user.budget_started_at is not None:
        BudgetResetLog.objects.create(
            user=user,
            budget=budget,
            previous_spend_usd=user.spend_usd,
            reset_at=start,
            next_reset_at=next_reset,
        )
    GatewayUser.objects.filter(pk=user.pk).update(
        budget=budget, spend_usd=ZERO, budget_started_at=start, next_budget_reset_at=next_reset
    )
    user.budget, user.spend_usd = budget, ZERO
    user.budget_started_at, user.next_budget_reset_at = start, next_reset


# ---------------------------------------------------------------------------------------
# Admission (§3.3)


def hold_open(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    model_key: str,
    now: datetime,
) -> BudgetState:
    """Reserve `amount_usd` for a request, or raise why not (general path).

    Rolls an ended period first. Refuses when the user is gone or blocked, or when
    `spend + reserved >= limit` or `spend + reserved + amount > limit`.
    """
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        if user.is_deleted:
            raise UnknownUser
        _period_roll_locked(user, now)
        if user.blocked:
            raise UserBlocked
        limit = _limit_usd(user, now)
        committed = user.spend_usd + user.reserved_usd
        if limit is not None and (committed >= limit or committed + amount_usd > limit):
            raise BudgetExceeded
        GatewayUser.objects.filter(pk=user.pk).update(reserved_usd=F("reserved_usd") + amount_usd)
        Hold.objects.create(
            request_id=request_id,
            user=user,
            amount_usd=amount_usd,
            model_key=model_key,
            created_at=now,
            expires_at=now + timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS),
        )
        user.reserved_usd += amount_usd
        return _state(user, now)


_HOLD_OPEN_SQL = """
WITH cap AS (
    SELECT b.max_budget_usd
           + CASE WHEN u.topup_expires_at > %(now)s THEN u.topup_usd ELSE 0 END AS limit_usd
    FROM budgets_gatewayuser u JOIN budgets_budget b ON b.budget_id = u.budget_id
    WHERE u.user_id = %(user_id)s
), admitted AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd + %(amount)s
    WHERE u.user_id = %(user_id)s
      AND u.deleted_at IS NULL AND NOT u.blocked
      AND (u.next_budget_reset_at IS NULL OR u.next_budget_reset_at > %(now)s)
      AND NOT EXISTS (
          SELECT 1 FROM cap
          WHERE u.spend_usd + u.reserved_usd >= cap.limit_usd
             OR u.spend_usd + u.reserved_usd + %(amount)s > cap.limit_usd)
    RETURNING u.spend_usd, u.reserved_usd, u.next_budget_reset_at
), held AS (
    INSERT INTO budgets_hold
        (request_id, user_id, amount_usd, status, model_key, created_at, expires_at)
    SELECT %(request_id)s, %(user_id)s, %(amount)s, 'open', %(model_key)s, %(now)s,
           %(expires_at)s
    FROM admitted
)
SELECT admitted.*, (SELECT limit_usd FROM cap) AS limit_usd FROM admitted
"""


async def hold_open_async(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    model_key: str,
    now: datetime,
) -> BudgetState:
    """`hold_open` for the request path: one statement when the common case applies.

    The statement is the whole admission rule as a conditional UPDATE: PostgreSQL locks
    the user's row and re-evaluates the condition on its latest version, so concurrent
    admissions queue on the row and each sees the others' reservations. It changes
    nothing when the user is blocked or gone, the period is due, or the money does not
    fit; the general path then rolls the period or names the refusal.
    """
    if pgpool.enabled():
        row = await pgpool.fetchone(
            _HOLD_OPEN_SQL,
            {
                "user_id": user_id,
                "request_id": request_id,
                "amount": amount_usd,
                "model_key": model_key,
                "now": now,
                "expires_at": now + timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS),
            },
        )
        if row is not None:
            return BudgetState(
                spend_usd=row["spend_usd"],
                reserved_usd=row["reserved_usd"],
                limit_usd=row["limit_usd"],
                next_reset_at=row["next_budget_reset_at"],
            )
    return await sync_to_async(hold_open)(
        user_id=user_id,
        request_id=request_id,
        amount_usd=amount_usd,
        model_key=model_key,
        now=now,
    )


# ---------------------------------------------------------------------------------------
# Closing a hold (§3.4): settle, refund, expire


def _usage_row_create(record: UsageRecord, timestamp: datetime) -> None:
    """Write the request's usage row; a second write of the same request is a no-op."""
    u = record.usage
    UsageLog.objects.bulk_create(
        [
            UsageLog(
                id=record.request_id,
                user_id=record.user_id,
                api_key_id=record.api_key_id,
                timestamp=timestamp,
                endpoint=record.endpoint,
                provider=record.provider,
                model=record.model,
                prompt_tokens=u.prompt_tokens if u else None,
                completion_tokens=u.output_tokens if u else None,
                total_tokens=u.total_tokens if u else None,
                cache_read_tokens=u.cache_read_tokens if u else None,
                cache_write_tokens=u.cache_write_tokens if u else None,
                cost_usd=record.cost_usd,
                status=record.status,
                status_code=record.status_code,
                error_message=record.error_message,
                latency_ms=record.latency_ms,
                counts_toward_budget=record.counts_toward_budget,
            )
        ],
        ignore_conflicts=True,
    )
    if record.api_key_id is not None:
        APIKey.objects.filter(pk=record.api_key_id).exclude(
            last_used_at__gte=timestamp - _KEY_TOUCH_INTERVAL
        ).update(last_used_at=timestamp)


def hold_settle(*, record: UsageRecord, now: datetime) -> BudgetState | None:
    """Charge a finished request and release its hold (general path).

    Open hold: release it and add the cost. Expired hold (the sweeper got there first):
    its reservation is already released, so only add the cost. Settled or refunded: the
    request was already closed; do nothing. The usage row is stamped no earlier than the
    current window's start, so invariant 2 holds even when the settle rolled the period.
    """
    with transaction.atomic(durable=True):
        hold = Hold.objects.select_for_update().filter(pk=record.request_id).first()
        if hold is None or hold.status in (Hold.Status.SETTLED, Hold.Status.REFUNDED):
            return None
        # Holds are never deleted and users only softly: the user row exists.
        user = _lock_user(hold.user_id)
        _period_roll_locked(user, now)
        release = hold.amount_usd if hold.status == Hold.Status.OPEN else ZERO
        Hold.objects.filter(pk=hold.pk).update(status=Hold.Status.SETTLED, closed_at=now)
        charge = record.charge_usd
        GatewayUser.objects.filter(pk=user.pk).update(
            reserved_usd=F("reserved_usd") - release,
            spend_usd=F("spend_usd") + charge,
            lifetime_spend_usd=F("lifetime_spend_usd") + charge,
        )
        _usage_row_create(record, max(now, user.budget_started_at or now))
        user.reserved_usd -= release
        user.spend_usd += charge
        return _state(user, now)


# Shared by the three closing statements: the key's last_used_at, at most once a minute.
_TOUCH_KEY = """
touched AS (
    UPDATE budgets_apikey SET last_used_at = %(now)s
    WHERE id = %(api_key_id)s
      AND (last_used_at IS NULL OR last_used_at < %(touch_before)s)
)"""
_USAGE_COLUMNS = """
    (id, user_id, api_key_id, timestamp, endpoint, provider, model, prompt_tokens,
     completion_tokens, total_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
     status, status_code, error_message, latency_ms, counts_toward_budget)"""
_USAGE_VALUES = """
    %(request_id)s, %(user_id)s, %(api_key_id)s, {timestamp}, %(endpoint)s, %(provider)s,
    %(model)s, %(prompt_tokens)s, %(completion_tokens)s, %(total_tokens)s,
    %(cache_read_tokens)s, %(cache_write_tokens)s, %(cost_usd)s, %(status)s,
    %(status_code)s, %(error_message)s, %(latency_ms)s, %(counts_toward_budget)s"""

_HOLD_SETTLE_SQL = f"""
WITH closed AS (
    UPDATE budgets_hold AS h
    SET status = 'settled', closed_at = %(now)s
    WHERE h.request_id = %(request_id)s AND h.status = 'open'
      AND EXISTS (
          SELECT 1 FROM budgets_gatewayuser u
          WHERE u.user_id = h.user_id
            AND (u.next_budget_reset_at IS NULL OR u.next_budget_reset_at > %(now)s))
    RETURNING h.user_id, h.amount_usd
), charged AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd - closed.amount_usd,
        spend_usd = u.spend_usd + %(charge_usd)s,
        lifetime_spend_usd = u.lifetime_spend_usd + %(charge_usd)s
    FROM closed
    WHERE u.user_id = closed.user_id
    RETURNING u.spend_usd, u.reserved_usd, u.next_budget_reset_at, u.budget_started_at,
              u.budget_id, u.topup_usd, u.topup_expires_at
), logged AS (
    INSERT INTO usage_usagelog {_USAGE_COLUMNS}
    SELECT {_USAGE_VALUES.format(timestamp="GREATEST(%(now)s, charged.budget_started_at)")}
    FROM charged
    ON CONFLICT (id) DO NOTHING
), {_TOUCH_KEY}
SELECT charged.spend_usd, charged.reserved_usd, charged.next_budget_reset_at,
       b.max_budget_usd
       + CASE WHEN charged.topup_expires_at > %(now)s THEN charged.topup_usd ELSE 0 END
       AS limit_usd
FROM charged LEFT JOIN budgets_budget b ON b.budget_id = charged.budget_id
"""


async def hold_settle_async(*, record: UsageRecord, now: datetime) -> BudgetState | None:
    """`hold_settle` for the request path: one statement when the hold is open and the
    period current (all three conditions are re-checked under the row locks); otherwise
    nothing is changed and the general path settles."""
    if pgpool.enabled():
        row = await pgpool.fetchone(_HOLD_SETTLE_SQL, record.usage_row_params(now))
        if row is not None:
            return BudgetState(
                spend_usd=row["spend_usd"],
                reserved_usd=row["reserved_usd"],
                limit_usd=row["limit_usd"],
                next_reset_at=row["next_budget_reset_at"],
            )
    return await sync_to_async(hold_settle)(record=record, now=now)


def hold_refund(*, record: UsageRecord, now: datetime) -> None:
    """Release a failed request's hold without charging, and log the failure.

    An already closed or expired hold is left alone; the usage row is written either way
    (at most once).
    """
    with transaction.atomic(durable=True):
        hold = (
            Hold.objects.select_for_update()
            .filter(pk=record.request_id, status=Hold.Status.OPEN)
            .first()
        )
        if hold is not None:
            Hold.objects.filter(pk=hold.pk).update(status=Hold.Status.REFUNDED, closed_at=now)
            GatewayUser.objects.filter(pk=hold.user_id).update(
                reserved_usd=F("reserved_usd") - hold.amount_usd
            )
        _usage_row_create(record, now)


_HOLD_REFUND_SQL = f"""
WITH released AS (
    UPDATE budgets_hold SET status = 'refunded', closed_at = %(now)s
    WHERE request_id = %(request_id)s AND status = 'open'
    RETURNING user_id, amount_usd
), unreserved AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd - released.amount_usd
    FROM released
    WHERE u.user_id = released.user_id
), logged AS (
    INSERT INTO usage_usagelog {_USAGE_COLUMNS}
    VALUES ({_USAGE_VALUES.format(timestamp="%(now)s")})
    ON CONFLICT (id) DO NOTHING
), {_TOUCH_KEY}
SELECT 1
"""


async def hold_refund_async(*, record: UsageRecord, now: datetime) -> None:
    """`hold_refund` for the request path: always one statement on PostgreSQL (a refund
    does not depend on the period, and a hold that is no longer open is left alone)."""
    if pgpool.enabled():
        await pgpool.fetchone(_HOLD_REFUND_SQL, record.usage_row_params(now))
        return
    await sync_to_async(hold_refund)(record=record, now=now)


def usage_record(*, record: UsageRecord, now: datetime) -> None:
    """Log a request that took no hold: refused, free, unpriced or excluded from budget."""
    with transaction.atomic(durable=True):
        _usage_row_create(record, now)


_USAGE_RECORD_SQL = f"""
WITH logged AS (
    INSERT INTO usage_usagelog {_USAGE_COLUMNS}
    VALUES ({_USAGE_VALUES.format(timestamp="%(now)s")})
    ON CONFLICT (id) DO NOTHING
), {_TOUCH_KEY}
SELECT 1
"""


async def usage_record_async(*, record: UsageRecord, now: datetime) -> None:
    if pgpool.enabled():
        await pgpool.fetchone(_USAGE_RECORD_SQL, record.usage_row_params(now))
        return
    await sync_to_async(usage_record)(record=record, now=now)


def hold_expire(*, request_id: uuid.UUID, now: datetime) -> bool:
    """Expire one open hold past its expiry and release its reservation.

    The compare-and-swap on status makes this safe against a settle or refund of the same
    hold in another process: exactly one of them moves it from open.
    """
    with transaction.atomic(durable=True):
        hold = (
            Hold.objects.select_for_update(skip_locked=True)
            .filter(pk=request_id, status=Hold.Status.OPEN, expires_at__lte=now)
            .first()
        )
        if hold is None:
            return False
        Hold.objects.filter(pk=hold.pk).update(status=Hold.Status.EXPIRED, closed_at=now)
        GatewayUser.objects.filter(pk=hold.user_id).update(
            reserved_usd=F("reserved_usd") - hold.amount_usd
        )
        return True


def holds_expire_stale(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """The sweeper: expire every open hold past `expires_at` (process death, §3.4)."""
    now = now or timezone.now()
    expired = 0
    while True:
        due = list(
            Hold.objects.filter(status=Hold.Status.OPEN, expires_at__lte=now)
            .order_by("expires_at")
            .values_list("request_id", flat=True)[:batch_size]
        )
        expired += sum(hold_expire(request_id=request_id, now=now) for request_id in due)
        if len(due) < batch_size:
            return expired


# ---------------------------------------------------------------------------------------
# Budgets and users


class _Unset:
    """Marks an argument the caller did not pass (None is a meaningful value here)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def budget_create(
    *,
    name: str = "",
    max_budget_usd: Decimal | None = None,
    budget_duration_sec: int | None = None,
    reset_alignment: str | None = None,
) -> Budget:
    return Budget.objects.create(
        name=name,
        max_budget_usd=max_budget_usd,
        budget_duration_sec=budget_duration_sec,
        reset_alignment=reset_alignment,
    )


def budget_update(
    *,
    budget_id: str,
    name: str = UNSET,
    max_budget_usd: Decimal | None = UNSET,
    budget_duration_sec: int | None = UNSET,
    reset_alignment: str | None = UNSET,
    now: datetime | None = None,
) -> Budget:
    """Change a budget. Takes effect on its users' next request in every process (nothing
    caches budgets). A changed period re-times each user's current window from its start
    (spend is kept; a window that has thereby ended rolls at the next request)."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        budget = Budget.objects.select_for_update().get(pk=budget_id)
        old_period = (budget.budget_duration_sec, budget.reset_alignment)
        for field_name, value in (
            ("name", name),
            ("max_budget_usd", max_budget_usd),
            ("budget_duration_sec", budget_duration_sec),
            ("reset_alignment", reset_alignment),
        ):
            if value is not UNSET:
                setattr(budget, field_name, value)
        budget.save()
        if (budget.budget_duration_sec, budget.reset_alignment) != old_period:
            # Lock the users in primary-key order, as every multi-row lock here does.
            for user in (
                GatewayUser.objects.select_for_update(no_key=True)
                .filter(budget=budget)
                .order_by("pk")
            ):
                start = user.budget_started_at or now
                if budget.has_period:
                    _, next_reset = periods.fresh_window(
                        start,
                        duration_sec=budget.budget_duration_sec,
                        alignment=budget.reset_alignment,
                    )
                else:
                    next_reset = None
                GatewayUser.objects.filter(pk=user.pk).update(
                    budget_started_at=start, next_budget_reset_at=next_reset
                )
        return budget


def budget_delete(*, budget_id: str) -> None:
    """Delete a budget that no user is on (its reset history is kept)."""
    with transaction.atomic(durable=True):
        budget = Budget.objects.select_for_update().get(pk=budget_id)
        if GatewayUser.objects.filter(budget=budget).exists():
            raise Conflict(
                "The budget still has users; move them to another budget first",
                code="budget_in_use",
            )
        budget.delete()


def user_create(
    *,
    user_id: str,
    alias: str = "",
    budget: Budget | None = None,
    blocked: bool = False,
    allowed_models: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> GatewayUser:
    """Create a user; a budget given here starts its first window now."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        user = GatewayUser.objects.create(
            user_id=user_id,
            alias=alias,
            blocked=blocked,
            allowed_models=allowed_models,
            metadata=metadata or {},
        )
        if budget is not None:
            _start_fresh_window(user, budget, now)
        return user


def user_update(
    *,
    user_id: str,
    alias: str = UNSET,
    blocked: bool = UNSET,
    allowed_models: list[str] | None = UNSET,
    metadata: dict[str, Any] = UNSET,
    budget: Budget | None = UNSET,
    now: datetime | None = None,
) -> GatewayUser:
    """Change a user. Moving them to a different budget starts a fresh window (§3.6);
    their spend and reserved are otherwise never edited here."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        changes = {
            name: value
            for name, value in (
                ("alias", alias),
                ("blocked", blocked),
                ("allowed_models", allowed_models),
                ("metadata", metadata),
            )
            if value is not UNSET
        }
        if changes:
            GatewayUser.objects.filter(pk=user.pk).update(**changes, updated_at=now)
        if budget is not UNSET and user.budget_id != (budget.budget_id if budget else None):
            _start_fresh_window(user, budget, now)
        user.refresh_from_db()
        return user


def user_budget_assign(
    *, user_id: str, budget: Budget | None, now: datetime | None = None
) -> GatewayUser:
    """Put a user on a budget (or none). A different budget starts a fresh window (§3.6)."""
    return user_update(user_id=user_id, budget=budget, now=now)


def user_delete(*, user_id: str, now: datetime | None = None) -> GatewayUser:
    """Soft-delete: the user can no longer be billed, their keys stop working, and their
    usage history stays."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        GatewayUser.objects.filter(pk=user.pk).update(deleted_at=now, updated_at=now)
        APIKey.objects.filter(user=user, is_active=True).update(is_active=False, updated_at=now)
        user.refresh_from_db()
        return user


def user_topup_set(
    *,
    user_id: str,
    amount_usd: Decimal,
    expires_at: datetime | None,
) -> GatewayUser:
    """Raise a user's limit by `amount_usd` until `expires_at` (0 or None removes it).

    A top-up replaces any previous one; it is added to the budget's max at admission.
    """
    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        if not amount_usd or expires_at is None:
            amount_usd, expires_at = ZERO, None
        GatewayUser.objects.filter(pk=user.pk).update(
            topup_usd=amount_usd, topup_expires_at=expires_at, updated_at=timezone.now()
        )
        user.refresh_from_db()
        return user


# ---------------------------------------------------------------------------------------
# Credentials (§1)

API_KEY_PREFIX = "gw-"
MASTER_KEY_PREFIX = "otari-mk-"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_api_key_secret() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(48)


def api_key_create(
    *,
    user: GatewayUser,
    key_name: str = "",
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    exclude_from_budget: bool = False,
    metadata: dict[str, Any] | None = None,
) -> tuple[APIKey, str]:
    """Create a key for `user`. Returns the key and its secret, which is not kept."""
    secret = _new_api_key_secret()
    key = APIKey.objects.create(
        user=user,
        key_hash=secret_hash(secret),
        key_prefix=secret[:10],
        key_suffix=secret[-4:],
        key_name=key_name,
        expires_at=expires_at,
        allowed_models=allowed_models,
        exclude_from_budget=exclude_from_budget,
        metadata=metadata or {},
    )
    return key, secret


def api_key_update(
    *,
    key_id: uuid.UUID,
    key_name: str = UNSET,
    is_active: bool = UNSET,
    expires_at: datetime | None = UNSET,
    allowed_models: list[str] | None = UNSET,
    exclude_from_budget: bool = UNSET,
    metadata: dict[str, Any] = UNSET,
) -> APIKey:
    """Change a key's settings (never its secret: see api_key_rotate)."""
    changes = {
        name: value
        for name, value in (
            ("key_name", key_name),
            ("is_active", is_active),
            ("expires_at", expires_at),
            ("allowed_models", allowed_models),
            ("exclude_from_budget", exclude_from_budget),
            ("metadata", metadata),
        )
        if value is not UNSET
    }
    with transaction.atomic(durable=True):
        key = APIKey.objects.select_for_update().get(pk=key_id)
        if changes:
            APIKey.objects.filter(pk=key.pk).update(**changes, updated_at=timezone.now())
            key.refresh_from_db()
        return key


def api_key_revoke(*, key_id: uuid.UUID) -> APIKey:
    """Deactivate a key: it stops working on the next request, in every process."""
    return api_key_update(key_id=key_id, is_active=False)


def api_key_rotate(*, key: APIKey) -> str:
    """Give the key a new secret; the old one stops working at once."""
    secret = _new_api_key_secret()
    APIKey.objects.filter(pk=key.pk).update(
        key_hash=secret_hash(secret),
        key_prefix=secret[:10],
        key_suffix=secret[-4:],
        updated_at=timezone.now(),
    )
    key.refresh_from_db()
    return secret


def master_key_matches(secret: str) -> bool:
    """Constant-time check of a presented master key (env var, or the stored hash)."""
    configured = settings.OTARI_MASTER_KEY
    if configured:
        return hmac.compare_digest(secret.encode(), configured.encode())
    stored = _stored_master_key_hash()
    return stored is not None and hmac.compare_digest(secret_hash(secret), stored)


_master_key_hash_cache: list[str] = []


def _stored_master_key_hash() -> str | None:
    # The generated master key never changes while a process runs: read it once.
    if not _master_key_hash_cache:
        stored = MasterKey.objects.values_list("key_hash", flat=True).first()
        if stored is None:
            return None
        _master_key_hash_cache.append(stored)
    return _master_key_hash_cache[0]


@dataclass(frozen=True)
class BootstrapResult:
    master_key: str | None
    api_key: str | None


def credentials_bootstrap() -> BootstrapResult:
    """First start: generate a master key (unless configured) and a `bootstrap` API key
    for user `default` (when there are no API keys at all). Secrets are returned once to
    be printed, and only their hashes are stored. Idempotent."""
    with transaction.atomic(durable=True):
        master = None
        if not settings.OTARI_MASTER_KEY and not MasterKey.objects.exists():
            master = MASTER_KEY_PREFIX + secrets.token_urlsafe(32)
            MasterKey.objects.create(key_hash=secret_hash(master))
        api_secret = None
        if not APIKey.objects.exists():
            user = GatewayUser.objects.filter(pk="default").first()
            if user is None:
                user = GatewayUser.objects.create(user_id="default", alias="default")
            _, api_secret = api_key_create(user=user, key_name="bootstrap")
        return BootstrapResult(master_key=master, api_key=api_secret)
