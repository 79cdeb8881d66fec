"""The budget service: holds, settlement, periods, users, keys (docs/SPEC.md §1, §3).

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

In platform mode (docs/SPEC.md §7) a request's usage record also carries one report per
resolved attempt: the outbox rows are written by the same statement (fast path) or in the
same transaction (general path) as the usage row, and their delivery is enqueued once
that commits (usage.services delivers them).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import secrets
import smtplib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from psycopg.types.json import Jsonb

from budgets import alerting, periods, selectors
from budgets.exceptions import (
    BudgetExceeded,
    InvalidAlertSettings,
    InvalidRateLimit,
    UnknownUser,
    UserBlocked,
)
from budgets.models import (
    MAX_RPM_LIMIT,
    MAX_TPM_LIMIT,
    APIKey,
    Budget,
    BudgetAlert,
    BudgetResetLog,
    GatewayUser,
    Hold,
    MasterKey,
)
from budgets.tasks import budget_alert_deliver as budget_alert_deliver_task
from common import pgpool
from common.exceptions import Conflict
from common.history import history_record
from otari.celery import enqueue, enqueue_detached, enqueue_on_commit
from usage.models import UsageLog, UsageReport
from usage.pricing import TokenUsage
from usage.reporting import AttemptReport
from usage.tasks import usage_report_push as usage_report_push_task

logger = logging.getLogger(__name__)

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
    error_code: str = ""
    upstream_status_code: int | None = None
    upstream_error: str = ""
    latency_ms: int | None = None
    # Platform mode: one report per resolved attempt, written with the usage row (§7).
    reports: tuple[AttemptReport, ...] = ()

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
            "error_code": self.error_code,
            "upstream_status_code": self.upstream_status_code,
            "upstream_error": self.upstream_error,
            "latency_ms": self.latency_ms,
            "counts_toward_budget": self.counts_toward_budget,
            "touch_before": now - _KEY_TOUCH_INTERVAL,
            **({"reports": Jsonb([r.row() for r in self.reports])} if self.reports else {}),
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
        return _start_fresh_window(user, user.budget, now, always_log=True)


def _start_fresh_window(
    user: GatewayUser, budget: Budget | None, now: datetime, *, always_log: bool = False
) -> BudgetResetLog | None:
    """Start a fresh window on `budget` now: spend 0, the next reset per its period.

    Must be called while holding the user's row lock. The spend of the window that ends
    is kept in a reset-log row, so nothing disappears from the books (a user who never
    had a window has nothing to keep, unless `always_log`).
    """
    if budget is None or not budget.has_period:
        start, next_reset = now, None
    else:
        start, next_reset = periods.fresh_window(
            now, duration_sec=budget.budget_duration_sec, alignment=budget.reset_alignment
        )
    log = None
    if always_log or user.spend_usd or user.budget_started_at is not None:
        log = BudgetResetLog.objects.create(
            user=user,
            budget=budget,
            previous_spend_usd=user.spend_usd,
            reset_at=start,
            next_reset_at=next_reset,
        )
    GatewayUser.objects.filter(pk=user.pk).update(
        budget=budget,
        spend_usd=ZERO,
        budget_started_at=start,
        next_budget_reset_at=next_reset,
        updated_at=now,
    )
    user.budget, user.spend_usd = budget, ZERO
    user.budget_started_at, user.next_budget_reset_at = start, next_reset
    return log


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
            raise BudgetExceeded(state=_state(user, now), needed_usd=amount_usd)
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
WITH admitted AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd + %(amount)s
    WHERE u.user_id = %(user_id)s
      AND u.deleted_at IS NULL AND NOT u.blocked
      AND (u.next_budget_reset_at IS NULL OR u.next_budget_reset_at > %(now)s)
      AND (%(limit)s::numeric IS NULL
           OR (u.spend_usd + u.reserved_usd < %(limit)s
               AND u.spend_usd + u.reserved_usd + %(amount)s <= %(limit)s))
    RETURNING u.spend_usd, u.reserved_usd, u.next_budget_reset_at
), held AS (
    INSERT INTO budgets_hold
        (request_id, user_id, amount_usd, status, model_key, created_at, expires_at)
    SELECT %(request_id)s, %(user_id)s, %(amount)s, 'open', %(model_key)s, %(now)s,
           %(expires_at)s
    FROM admitted
)
SELECT * FROM admitted
"""


async def hold_open_async(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    limit_usd: Decimal | None,
    model_key: str,
    now: datetime,
) -> BudgetState:
    """`hold_open` for the request path: one statement when the common case applies.

    The statement is the whole admission rule as a conditional UPDATE of the user's row:
    PostgreSQL locks the row and re-evaluates the condition on its latest version, so
    concurrent admissions queue on the row and each sees the others' reservations. The
    condition reads only that row and constants (`limit_usd`, as loaded with the caller):
    a condition that joined other tables (e.g. the budget row) would not be re-evaluated
    against the latest version when it is written as a join, and admitted too many
    requests in our concurrency test. It changes nothing when the user is blocked or gone,
    the period is due, or the money does not fit; the general path then rolls the period
    or names the refusal.
    """
    if pgpool.enabled():
        row = await pgpool.fetchone(
            _HOLD_OPEN_SQL,
            {
                "user_id": user_id,
                "request_id": request_id,
                "amount": amount_usd,
                "limit": limit_usd,
                "model_key": model_key,
                "now": now,
                "expires_at": now + timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS),
            },
        )
        if row is not None:
            return BudgetState(
                spend_usd=row["spend_usd"],
                reserved_usd=row["reserved_usd"],
                limit_usd=limit_usd,
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
                error_code=record.error_code,
                upstream_status_code=record.upstream_status_code,
                upstream_error=record.upstream_error,
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
    if record.reports:
        _reports_create(record, timestamp)


def _reports_create(record: UsageRecord, now: datetime) -> None:
    """Platform mode: the request's outbox rows, in the usage row's transaction, and
    their delivery once it commits (§7). A report already written (same attempt id) is
    left alone."""
    UsageReport.objects.bulk_create(
        [
            UsageReport(
                request_id=record.request_id,
                user_id=record.user_id,
                next_attempt_at=now,
                created_at=now,
                **report.row(),
            )
            for report in record.reports
        ],
        ignore_conflicts=True,
    )
    transaction.on_commit(lambda: _reports_enqueue(record))


def _reports_enqueue(record: UsageRecord) -> None:
    """Hand the reports to the delivery task, without waiting for the broker: the rows
    are committed, and the periodic re-drive finds any report whose message was lost."""
    for report in record.reports:
        enqueue_detached(usage_report_push_task, report.correlation_id)


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
# SKIP LOCKED: two closing statements of one key can each hold the row the other needs
# next (the user's, the key's); the touch is bookkeeping, so it gives way instead of
# waiting, which deadlocked (found by tests/observability, two requests of one key).
_TOUCH_KEY = """
touched AS (
    UPDATE budgets_apikey SET last_used_at = %(now)s
    WHERE id = (
        SELECT id FROM budgets_apikey
        WHERE id = %(api_key_id)s
          AND (last_used_at IS NULL OR last_used_at < %(touch_before)s)
        FOR NO KEY UPDATE SKIP LOCKED)
)"""
_USAGE_COLUMNS = """
    (id, user_id, api_key_id, timestamp, endpoint, provider, model, prompt_tokens,
     completion_tokens, total_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
     status, status_code, error_message, error_code, upstream_status_code, upstream_error,
     latency_ms, counts_toward_budget)"""
_USAGE_VALUES = """
    %(request_id)s, %(user_id)s, %(api_key_id)s, {timestamp}, %(endpoint)s, %(provider)s,
    %(model)s, %(prompt_tokens)s, %(completion_tokens)s, %(total_tokens)s,
    %(cache_read_tokens)s, %(cache_write_tokens)s, %(cost_usd)s, %(status)s,
    %(status_code)s, %(error_message)s, %(error_code)s, %(upstream_status_code)s,
    %(upstream_error)s,
    %(latency_ms)s, %(counts_toward_budget)s"""

# Platform mode (§7): the request's attempt reports, inserted by the statement that writes
# its usage row, so both commit together. `{condition}` ties them to that row's insert.
_REPORTS_INSERT = """
reported AS (
    INSERT INTO usage_usagereport
        (correlation_id, request_id, platform_request_id, user_id, position, provider, model,
         status, is_final_attempt, prompt_tokens, completion_tokens, total_tokens,
         cache_read_tokens, cache_write_tokens, error_class, delivery_status, attempts,
         next_attempt_at, last_error, created_at)
    SELECT r.correlation_id, %(request_id)s, r.platform_request_id, %(user_id)s, r.position,
           r.provider, r.model, r.status, r.is_final_attempt, r.prompt_tokens,
           r.completion_tokens, r.total_tokens, r.cache_read_tokens, r.cache_write_tokens,
           r.error_class, 'pending', 0, %(now)s, '', %(now)s
    FROM jsonb_to_recordset(%(reports)s) AS r(
        correlation_id text, platform_request_id text, position int, provider text,
        model text, status text, is_final_attempt boolean, prompt_tokens int,
        completion_tokens int, total_tokens int, cache_read_tokens int,
        cache_write_tokens int, error_class text)
    {condition}
    ON CONFLICT (correlation_id) DO NOTHING
)"""


def _with_reports(sql: str, condition: str = "") -> str:
    """A closing statement that also writes the request's attempt reports."""
    return sql.replace("{reports}", ", " + _REPORTS_INSERT.format(condition=condition))


_HOLD_SETTLE_TEMPLATE = f"""
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
), {_TOUCH_KEY}{{reports}}
SELECT charged.spend_usd, charged.reserved_usd, charged.next_budget_reset_at,
       b.max_budget_usd
       + CASE WHEN charged.topup_expires_at > %(now)s THEN charged.topup_usd ELSE 0 END
       AS limit_usd
FROM charged LEFT JOIN budgets_budget b ON b.budget_id = charged.budget_id
"""
_HOLD_SETTLE_SQL = _HOLD_SETTLE_TEMPLATE.replace("{reports}", "")
# The reports only when this statement settled (and so wrote the usage row); otherwise
# the general path writes both.
_HOLD_SETTLE_REPORTED_SQL = _with_reports(
    _HOLD_SETTLE_TEMPLATE, "WHERE EXISTS (SELECT 1 FROM charged)"
)


async def hold_settle_async(*, record: UsageRecord, now: datetime) -> BudgetState | None:
    """`hold_settle` for the request path: one statement when the hold is open and the
    period current (all three conditions are re-checked under the row locks); otherwise
    nothing is changed and the general path settles."""
    if pgpool.enabled():
        sql = _HOLD_SETTLE_REPORTED_SQL if record.reports else _HOLD_SETTLE_SQL
        row = await pgpool.fetchone(sql, record.usage_row_params(now))
        if row is not None:
            if record.reports:
                _reports_enqueue(record)
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


_HOLD_REFUND_TEMPLATE = f"""
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
), {_TOUCH_KEY}{{reports}}
SELECT 1
"""
_HOLD_REFUND_SQL = _HOLD_REFUND_TEMPLATE.replace("{reports}", "")
_HOLD_REFUND_REPORTED_SQL = _with_reports(_HOLD_REFUND_TEMPLATE)


async def hold_refund_async(*, record: UsageRecord, now: datetime) -> None:
    """`hold_refund` for the request path: always one statement on PostgreSQL (a refund
    does not depend on the period, and a hold that is no longer open is left alone)."""
    if pgpool.enabled():
        sql = _HOLD_REFUND_REPORTED_SQL if record.reports else _HOLD_REFUND_SQL
        await pgpool.fetchone(sql, record.usage_row_params(now))
        if record.reports:
            _reports_enqueue(record)
        return
    await sync_to_async(hold_refund)(record=record, now=now)


def usage_record(*, record: UsageRecord, now: datetime) -> None:
    """Log a request that took no hold: refused, free, unpriced or excluded from budget."""
    with transaction.atomic(durable=True):
        _usage_row_create(record, now)


_USAGE_RECORD_TEMPLATE = f"""
WITH logged AS (
    INSERT INTO usage_usagelog {_USAGE_COLUMNS}
    VALUES ({_USAGE_VALUES.format(timestamp="%(now)s")})
    ON CONFLICT (id) DO NOTHING
), {_TOUCH_KEY}{{reports}}
SELECT 1
"""
_USAGE_RECORD_SQL = _USAGE_RECORD_TEMPLATE.replace("{reports}", "")
_USAGE_RECORD_REPORTED_SQL = _with_reports(_USAGE_RECORD_TEMPLATE)


async def usage_record_async(*, record: UsageRecord, now: datetime) -> None:
    if pgpool.enabled():
        sql = _USAGE_RECORD_REPORTED_SQL if record.reports else _USAGE_RECORD_SQL
        await pgpool.fetchone(sql, record.usage_row_params(now))
        if record.reports:
            _reports_enqueue(record)
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


def _alert_settings_clean(
    *, thresholds_pct: Any = UNSET, webhook_url: Any = UNSET, emails: Any = UNSET
) -> dict[str, Any]:
    """The alert settings that were passed, validated (InvalidAlertSettings otherwise)."""
    cleaned: dict[str, Any] = {}
    try:
        if thresholds_pct is not UNSET:
            cleaned["alert_thresholds_pct"] = alerting.clean_thresholds(thresholds_pct)
        if webhook_url is not UNSET:
            cleaned["alert_webhook_url"] = alerting.clean_webhook_url(webhook_url)
        if emails is not UNSET:
            cleaned["alert_emails"] = alerting.clean_emails(emails)
    except ValidationError as exc:
        # The messages name the rule, never the rejected value.
        raise InvalidAlertSettings("; ".join(exc.messages)) from None
    return cleaned


def _rate_limits_check(*, rpm_limit: Any = UNSET, tpm_limit: Any = UNSET) -> None:
    """Rate limits are null (unlimited) or whole numbers from 1 to their maximum: 0 would
    refuse every request (blocking a user says that), and a value past the column's range
    would be a database error. InvalidRateLimit (422) names the rule, not the value."""
    for name, value, maximum in (
        ("rpm_limit", rpm_limit, MAX_RPM_LIMIT),
        ("tpm_limit", tpm_limit, MAX_TPM_LIMIT),
    ):
        if value is UNSET or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidRateLimit(
                f"{name}: Must be a whole number from 1 to {maximum}, or null for no limit."
            )


def budget_create(
    *,
    name: str = "",
    max_budget_usd: Decimal | None = None,
    budget_duration_sec: int | None = None,
    reset_alignment: str | None = None,
    alert_thresholds_pct: list[int] = UNSET,
    alert_webhook_url: str = UNSET,
    alert_emails: list[str] = UNSET,
) -> Budget:
    alerts = _alert_settings_clean(
        thresholds_pct=alert_thresholds_pct, webhook_url=alert_webhook_url, emails=alert_emails
    )
    return Budget.objects.create(
        name=name,
        max_budget_usd=max_budget_usd,
        budget_duration_sec=budget_duration_sec,
        reset_alignment=reset_alignment,
        **alerts,
    )


def budget_update(
    *,
    budget_id: str,
    name: str = UNSET,
    max_budget_usd: Decimal | None = UNSET,
    budget_duration_sec: int | None = UNSET,
    reset_alignment: str | None = UNSET,
    alert_thresholds_pct: list[int] = UNSET,
    alert_webhook_url: str = UNSET,
    alert_emails: list[str] = UNSET,
    now: datetime | None = None,
) -> Budget:
    """Change a budget. Takes effect on its users' next request in every process (nothing
    caches budgets). A changed period re-times each user's current window from its start
    (spend is kept; a window that has thereby ended rolls at the next request)."""
    now = now or timezone.now()
    alerts = _alert_settings_clean(
        thresholds_pct=alert_thresholds_pct, webhook_url=alert_webhook_url, emails=alert_emails
    )
    with transaction.atomic(durable=True):
        budget = Budget.objects.select_for_update().get(pk=budget_id)
        old_period = (budget.budget_duration_sec, budget.reset_alignment)
        for field_name, value in (
            ("name", name),
            ("max_budget_usd", max_budget_usd),
            ("budget_duration_sec", budget_duration_sec),
            ("reset_alignment", reset_alignment),
            *alerts.items(),
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
    """Delete a budget that no live user is on (its reset history is kept).

    Deleted users still pointing at it are detached first: they can never be billed
    again, and otherwise nothing could ever free the budget (a deleted user cannot be
    moved to another one).
    """
    with transaction.atomic(durable=True):
        budget = Budget.objects.select_for_update().get(pk=budget_id)
        if GatewayUser.objects.filter(budget=budget, deleted_at__isnull=True).exists():
            raise Conflict(
                "The budget still has users; move them to another budget first",
                code="budget_in_use",
            )
        GatewayUser.objects.filter(budget=budget).update(budget=None, next_budget_reset_at=None)
        budget.delete()


def user_create(
    *,
    user_id: str,
    alias: str = "",
    budget: Budget | None = None,
    blocked: bool = False,
    allowed_models: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    now: datetime | None = None,
) -> GatewayUser:
    """Create a user; a budget given here starts its first window now."""
    _rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        # Created on its budget, so that its first version names it (otari/history.py).
        user = GatewayUser.objects.create(
            user_id=user_id,
            alias=alias,
            budget=budget,
            blocked=blocked,
            allowed_models=allowed_models,
            metadata=metadata or {},
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )
        if budget is not None:
            _start_fresh_window(user, budget, now)
        return user


def user_ensure(*, user_id: str) -> GatewayUser:
    """The user a platform resolve named (docs/SPEC.md §7), created on first sight: no
    budget (the platform prices and bills), marked in its metadata as the platform's.
    Safe under concurrency: of two first requests, one creates and the other reads."""
    with transaction.atomic(durable=True):
        user, _ = GatewayUser.objects.get_or_create(
            pk=user_id, defaults={"metadata": {"created_by": "platform"}}
        )
        return user


def user_update(
    *,
    user_id: str,
    alias: str = UNSET,
    blocked: bool = UNSET,
    allowed_models: list[str] | None = UNSET,
    metadata: dict[str, Any] = UNSET,
    budget: Budget | None = UNSET,
    rpm_limit: int | None = UNSET,
    tpm_limit: int | None = UNSET,
    now: datetime | None = None,
) -> GatewayUser:
    """Change a user. Moving them to a different budget starts a fresh window (§3.6);
    their spend and reserved are otherwise never edited here."""
    _rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
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
                ("rpm_limit", rpm_limit),
                ("tpm_limit", tpm_limit),
            )
            if value is not UNSET
        }
        if changes:
            GatewayUser.objects.filter(pk=user.pk).update(**changes, updated_at=now)
        moved = budget is not UNSET and user.budget_id != (budget.budget_id if budget else None)
        if moved:
            _start_fresh_window(user, budget, now)
        user.refresh_from_db()
        if changes or moved:
            history_record(user)
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
        live_keys = list(APIKey.objects.filter(user=user, is_active=True).order_by("pk"))
        APIKey.objects.filter(pk__in=[k.pk for k in live_keys]).update(
            is_active=False, updated_at=now
        )
        user.refresh_from_db()
        history_record(user)
        for key in live_keys:
            key.is_active = False
            history_record(key)
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
        history_record(user)
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
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> tuple[APIKey, str]:
    """Create a key for `user`. Returns the key and its secret, which is not kept."""
    _rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
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
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
    )
    return key, secret


def api_key_create_with_user(
    *,
    key_name: str = "",
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    exclude_from_budget: bool = False,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> tuple[APIKey, str]:
    """Create a key together with a user of its own (`apikey-<hex>`, aliased after the
    key's name), for a key created without a user: every key bills exactly one user.
    Both rows or neither. The rate limits are the key's (its user has none)."""
    _rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    with transaction.atomic(durable=True):
        user = GatewayUser.objects.create(
            user_id=f"apikey-{uuid.uuid4().hex}", alias=key_name, metadata={}
        )
        return api_key_create(
            user=user,
            key_name=key_name,
            expires_at=expires_at,
            allowed_models=allowed_models,
            exclude_from_budget=exclude_from_budget,
            metadata=metadata,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )


def api_key_update(
    *,
    key_id: uuid.UUID,
    key_name: str = UNSET,
    is_active: bool = UNSET,
    expires_at: datetime | None = UNSET,
    allowed_models: list[str] | None = UNSET,
    exclude_from_budget: bool = UNSET,
    metadata: dict[str, Any] = UNSET,
    rpm_limit: int | None = UNSET,
    tpm_limit: int | None = UNSET,
) -> APIKey:
    """Change a key's settings (never its secret: see api_key_rotate)."""
    _rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    changes = {
        name: value
        for name, value in (
            ("key_name", key_name),
            ("is_active", is_active),
            ("expires_at", expires_at),
            ("allowed_models", allowed_models),
            ("exclude_from_budget", exclude_from_budget),
            ("metadata", metadata),
            ("rpm_limit", rpm_limit),
            ("tpm_limit", tpm_limit),
        )
        if value is not UNSET
    }
    with transaction.atomic(durable=True):
        key = APIKey.objects.select_for_update().get(pk=key_id)
        if changes:
            APIKey.objects.filter(pk=key.pk).update(**changes, updated_at=timezone.now())
            key.refresh_from_db()
            history_record(key)
        return key


def api_key_revoke(*, key_id: uuid.UUID) -> APIKey:
    """Deactivate a key: it stops working on the next request, in every process."""
    return api_key_update(key_id=key_id, is_active=False)


def api_key_rotate(*, key: APIKey) -> str:
    """Give the key a new secret; the old one stops working at once."""
    secret = _new_api_key_secret()
    with transaction.atomic(durable=True):
        APIKey.objects.filter(pk=key.pk).update(
            key_hash=secret_hash(secret),
            key_prefix=secret[:10],
            key_suffix=secret[-4:],
            updated_at=timezone.now(),
        )
        key.refresh_from_db()
        # The version shows the new prefix and suffix; the hash is never versioned.
        history_record(key)
    return secret


def master_key_matches(secret: str) -> bool:
    """Constant-time check of a presented master key (env var, or the stored hash)."""
    configured = settings.OTARI_MASTER_KEY
    if configured:
        return hmac.compare_digest(secret.encode(), configured.encode())
    stored = _stored_master_key_hash()
    return stored is not None and hmac.compare_digest(secret_hash(secret), stored)


# The stored hash is read again after this long, so that a key replaced by
# `manage.py rotate_master_key` takes effect in every running process, with no restart.
MASTER_KEY_RECHECK_SECONDS = 5.0
# (hash, when it was read, time.monotonic()); the one entry of a per-process cache.
_master_key_hash_cache: list[tuple[str | None, float]] = []


def _stored_master_key_hash() -> str | None:
    now = time.monotonic()
    if not _master_key_hash_cache or now - _master_key_hash_cache[0][1] >= (
        MASTER_KEY_RECHECK_SECONDS
    ):
        stored = MasterKey.objects.values_list("key_hash", flat=True).first()
        _master_key_hash_cache[:] = [(stored, now)]
    return _master_key_hash_cache[0][0]


def master_key_rotate() -> str:
    """Replace the generated master key (lost, or seen by someone it should not have
    been): the new secret is returned once, to be printed; only its hash is stored, and
    the old key stops working (in other processes within MASTER_KEY_RECHECK_SECONDS).

    A master key configured with OTARI_MASTER_KEY is the operator's to change there:
    refused with `Conflict`.
    """
    if settings.OTARI_MASTER_KEY:
        raise Conflict(
            "The master key is set by OTARI_MASTER_KEY: change that variable and restart"
        )
    master = MASTER_KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic(durable=True):
        MasterKey.objects.all().delete()
        MasterKey.objects.create(key_hash=secret_hash(master))
    _master_key_hash_cache.clear()
    return master


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


# ---------------------------------------------------------------------------------------
# Operations: the reset sweep and the audit (docs/SPEC.md §3.5, §3.6, §8). The management
# commands and the Celery beat tasks call these; so does the embedded mode's tick.


@dataclass(frozen=True)
class RollSummary:
    """What `budgets_roll_due` found and did."""

    now: datetime
    dry_run: bool
    # Users whose window had ended when the sweep listed them.
    due_user_ids: list[str]
    # The windows this call began (none on a dry run), with the spend each one closed.
    rolled: list[BudgetResetLog]
    # Due users whose budget no longer has a period: their schedule was cleared.
    cleared: int = 0
    # Due users whose row another transaction held: skipped, because whoever holds it is
    # rolling them or admitting a request (admission rolls first); the next sweep retries.
    busy: int = 0
    # Due users another process rolled between the listing and the lock.
    rolled_elsewhere: int = 0

    @property
    def previous_spend_usd(self) -> Decimal:
        return sum((log.previous_spend_usd for log in self.rolled), ZERO)


def _user_roll_if_due(
    *, user_id: str, now: datetime, wait: bool
) -> tuple[str, BudgetResetLog | None]:
    """Roll one user's period if it is due: ("rolled", log), or ("cleared" | "busy" |
    "current", None)."""
    with transaction.atomic(durable=True):
        # skip_locked (unless waiting was asked for): two sweeps on two hosts leapfrog each
        # other instead of queueing on the same rows, and a user in the middle of a request
        # is left to that request, which rolls the period itself before admitting.
        user = (
            GatewayUser.objects.select_for_update(no_key=True, of=("self",), skip_locked=not wait)
            .select_related("budget")
            .filter(pk=user_id)
            .first()
        )
        if user is None:
            return "busy", None
        was_due = user.next_budget_reset_at is not None and user.next_budget_reset_at <= now
        log = _period_roll_locked(user, now)
        if log is not None:
            return "rolled", log
        if was_due and user.next_budget_reset_at is None:
            return "cleared", None
        return "current", None


def budgets_roll_due(
    *,
    now: datetime | None = None,
    user_id: str | None = None,
    budget_id: str | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
) -> RollSummary:
    """Roll every period that has ended by `now` (§3.6), one user per transaction.

    Safe from any number of processes at once: each roll is a compare-and-swap on the
    user's `next_budget_reset_at` under the row lock, and a window can only begin once
    (unique reset-log row). A user whose window has not ended is never touched, so a
    budget created or assigned a moment ago is never zeroed; `reserved` is never touched.
    """
    from budgets.selectors import users_due_for_reset

    now = now or timezone.now()
    due_ids: list[str] = []
    rolled: list[BudgetResetLog] = []
    counts = {"cleared": 0, "busy": 0, "current": 0}
    after = ""
    while True:
        # Keyset pages: rolled users leave the due set, skipped ones stay in it.
        batch = list(
            users_due_for_reset(now=now, user_id=user_id, budget_id=budget_id)
            .filter(pk__gt=after)
            .values_list("pk", flat=True)[:batch_size]
        )
        if not batch:
            break
        after = batch[-1]
        due_ids.extend(batch)
        if dry_run:
            continue
        for uid in batch:
            outcome, log = _user_roll_if_due(user_id=uid, now=now, wait=user_id is not None)
            if log is not None:
                rolled.append(log)
            else:
                counts[outcome] += 1
    return RollSummary(
        now=now,
        dry_run=dry_run,
        due_user_ids=due_ids,
        rolled=rolled,
        cleared=counts["cleared"],
        busy=counts["busy"],
        rolled_elsewhere=counts["current"],
    )


@dataclass(frozen=True)
class BookRepair:
    """What `user_books_repair` changed on one user."""

    user_id: str
    reserved_before_usd: Decimal
    reserved_after_usd: Decimal
    spend_before_usd: Decimal
    spend_after_usd: Decimal


def user_books_repair(*, user_id: str) -> BookRepair | None:
    """Set the user's `reserved` and `spend` to what their ledger says (§3.5 1 and 2).

    The sums are read while holding the user's row lock: every statement that moves
    money for this user (admission, settle, refund, expiry) changes this row in the same
    transaction as the holds and usage rows, so under the lock the two cannot disagree
    because of a request in flight. Returns None when the books already balance.
    """
    from budgets.selectors import books_for_users

    with transaction.atomic(durable=True):
        try:
            user = _lock_user(user_id)
        except GatewayUser.DoesNotExist:
            raise UnknownUser from None
        (book,) = books_for_users(user_id=user_id)
        if book.balanced:
            return None
        GatewayUser.objects.filter(pk=user.pk).update(
            reserved_usd=book.open_holds_usd, spend_usd=book.window_usage_usd
        )
        repair = BookRepair(
            user_id=user_id,
            reserved_before_usd=book.reserved_usd,
            reserved_after_usd=book.open_holds_usd,
            spend_before_usd=book.spend_usd,
            spend_after_usd=book.window_usage_usd,
        )
    logger.warning(
        "audit repair of user %s: reserved %s -> %s, spend %s -> %s",
        user_id,
        _money_str(repair.reserved_before_usd),
        _money_str(repair.reserved_after_usd),
        _money_str(repair.spend_before_usd),
        _money_str(repair.spend_after_usd),
    )
    return repair


@dataclass(frozen=True)
class AuditResult:
    """The drift `budgets_audit` found, and what it repaired when asked to."""

    drifts: list[Any]  # budgets.selectors.BookDrift
    # Open holds past expires_at + one sweep interval (§3.5 invariant 4).
    stale_holds: int
    repairs: list[BookRepair]
    stale_holds_expired: int = 0

    @property
    def clean(self) -> bool:
        return not self.drifts and not self.stale_holds


def budgets_audit(*, fix: bool = False, now: datetime | None = None) -> AuditResult:
    """Check the §3.5 invariants; with `fix`, expire overdue holds and repair the books."""
    from budgets.selectors import books_drift_list, holds_stale

    now = now or timezone.now()
    drifts = books_drift_list()
    overdue = now - timedelta(seconds=settings.OTARI_BEAT_INTERVAL_SECONDS)
    stale = holds_stale(now=overdue).count()
    repairs: list[BookRepair] = []
    expired = 0
    if fix:
        # The sweep first: it releases reservations in step with the holds, so the
        # repair that follows only corrects what the ledger itself disagrees with.
        if stale:
            expired = holds_expire_stale(now=now)
        for drift in drifts:
            repair = user_books_repair(user_id=drift.user_id)
            if repair is not None:
                repairs.append(repair)
    return AuditResult(
        drifts=drifts, stale_holds=stale, repairs=repairs, stale_holds_expired=expired
    )


# ---------------------------------------------------------------------------------------
# Budget alerts (beyond the reference; docs/OPERATIONS.md)

# Attempts per alert in all (the first and five retries), with backoff doubling from 1 s.
ALERT_MAX_ATTEMPTS = 6
_ALERT_BACKOFF_CAP_S = 60.0
# An attempt longer than this is presumed dead and its alert may be attempted again.
_ALERT_LEASE = timedelta(minutes=2)
# A pending alert untouched this long lost its delivery (a worker died, the broker lost
# the message): the periodic sweep enqueues it again.
_ALERT_REDRIVE_AFTER = timedelta(minutes=10)


def budget_alerts_check(*, user_id: str, now: datetime | None = None) -> list[BudgetAlert]:
    """Record every alert threshold the user's spend has reached in the current window,
    at most once per user, budget, threshold and window, and deliver each new one by a
    task enqueued when the transaction commits.

    Reads without the user's lock: spend only grows within a window, so a threshold seen
    reached stays reached; the unique constraint decides between concurrent checks.
    """
    now = now or timezone.now()
    created: list[BudgetAlert] = []
    with transaction.atomic(durable=True):
        user = (
            GatewayUser.objects.select_related("budget")
            .filter(pk=user_id, deleted_at__isnull=True)
            .first()
        )
        if user is None or user.budget is None or not user.budget.alerts_enabled:
            return created
        if user.next_budget_reset_at is not None and user.next_budget_reset_at <= now:
            # The window is over; the next one starts from zero.
            return created
        budget = user.budget
        limit = _limit_usd(user, now)
        period_start = user.budget_started_at or user.created_at
        reached = alerting.thresholds_reached(
            budget.alert_thresholds_pct,
            spend_usd=user.spend_usd,
            limit_usd=limit,
            refused=selectors.budget_refused_since(user_id=user.pk, since=period_start),
        )
        if not reached:
            return created
        known = set(
            BudgetAlert.objects.filter(
                user=user, budget=budget, period_started_at=period_start
            ).values_list("threshold_pct", flat=True)
        )
        for threshold in reached:
            if threshold in known:
                continue
            try:
                # A savepoint: a concurrent check that inserted the same alert first
                # makes this insert fail, and only this insert.
                with transaction.atomic():
                    alert = BudgetAlert.objects.create(
                        user=user,
                        budget=budget,
                        threshold_pct=threshold,
                        period_started_at=period_start,
                        period_ends_at=user.next_budget_reset_at,
                        spend_usd=user.spend_usd,
                        limit_usd=limit,
                        webhook_url=budget.alert_webhook_url,
                        emails=list(budget.alert_emails),
                        created_at=now,
                    )
            except IntegrityError:
                continue
            created.append(alert)
            enqueue_on_commit(budget_alert_deliver_task, alert.pk)
    for alert in created:
        logger.info("budget alert: user %s reached %s%% of %s", user_id, alert.threshold_pct, limit)
    return created


@dataclass(frozen=True)
class AlertSweep:
    created: list[BudgetAlert]
    redriven: int


def budget_alerts_sweep(*, now: datetime | None = None) -> AlertSweep:
    """The periodic safety net for alerts (beat, every interval).

    Settlement raises an alert when a request *crosses* a threshold. This finds the
    thresholds that are *reached* without an alert: a limit lowered or a top-up expired
    under a user's spend, or a process that died between a settle and its alert. It also
    re-enqueues alerts whose delivery was lost.
    """
    now = now or timezone.now()
    created: list[BudgetAlert] = []
    budgets = [
        b for b in Budget.objects.filter(max_budget_usd__gt=0).order_by("pk") if b.alerts_enabled
    ]
    for budget in budgets:
        # A top-up only raises the limit, so users below the lowest threshold of the
        # budget's own max cannot have reached any threshold.
        floor = alerting.threshold_usd(budget.max_budget_usd, min(budget.alert_thresholds_pct))
        candidates = GatewayUser.objects.filter(
            Q(spend_usd__gte=floor, spend_usd__gt=0) | Q(selectors.refused_in_window()),
            budget=budget,
            deleted_at__isnull=True,
        ).values_list("pk", flat=True)
        for uid in candidates:
            created.extend(budget_alerts_check(user_id=uid, now=now))
    stalled = BudgetAlert.objects.filter(
        Q(last_attempt_at__isnull=True, created_at__lte=now - _ALERT_REDRIVE_AFTER)
        | Q(last_attempt_at__lte=now - _ALERT_REDRIVE_AFTER),
        status=BudgetAlert.Status.PENDING,
    ).values_list("pk", flat=True)
    redriven = 0
    for alert_id in stalled:
        enqueue(budget_alert_deliver_task, alert_id)
        redriven += 1
    return AlertSweep(created=created, redriven=redriven)


class _TransientDeliveryError(Exception):
    """A delivery failure worth retrying (timeout, connection error, 408/425/429/5xx)."""


def _money_str(amount: Decimal) -> str:
    # Exact, and without the column's ten trailing decimal places.
    return format(amount.normalize(), "f")


def budget_alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    """The webhook's JSON body (amounts as exact decimal strings)."""
    return {
        "type": "budget.threshold_reached",
        "alert_id": alert.pk,
        "user": alert.user_id,
        "budget": alert.budget_id,
        "threshold": alert.threshold_pct,
        "spend": _money_str(alert.spend_usd),
        "limit": _money_str(alert.limit_usd),
        "currency": "USD",
        "period_start": alert.period_started_at.isoformat(),
        "period_end": alert.period_ends_at.isoformat() if alert.period_ends_at else None,
        "created_at": alert.created_at.isoformat(),
    }


def _alert_webhook_send(alert: BudgetAlert) -> None:
    """POST the alert; raise _TransientDeliveryError or ValueError (permanent)."""
    try:
        response = httpx.post(
            alert.webhook_url,
            json=budget_alert_payload(alert),
            headers={"X-Otari-Alert-Id": str(alert.pk), "User-Agent": "otari-gateway"},
            timeout=settings.OTARI_ALERT_WEBHOOK_TIMEOUT_SECONDS,
            follow_redirects=False,
        )
    except httpx.TransportError as exc:
        raise _TransientDeliveryError(f"webhook: {type(exc).__name__}") from exc
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (408, 425, 429) or status >= 500:
        raise _TransientDeliveryError(f"webhook: HTTP {status}")
    raise ValueError(f"webhook: HTTP {status}")


def _alert_email_send(alert: BudgetAlert) -> None:
    """Mail the alert through Django's mail backend; raise as `_alert_webhook_send`."""
    period_end = f"{alert.period_ends_at:%Y-%m-%d %H:%M} UTC" if alert.period_ends_at else "never"
    subject = f"[otari] {alert.user_id} has used {alert.threshold_pct}% of their budget"
    body = (
        f"User {alert.user_id} has spent ${_money_str(alert.spend_usd)} of their "
        f"${_money_str(alert.limit_usd)} limit (budget {alert.budget_id}), reaching the "
        f"{alert.threshold_pct}% alert threshold.\n\nThe budget period resets: {period_end}.\n"
    )
    try:
        send_mail(subject, body, settings.OTARI_ALERT_FROM_EMAIL, list(alert.emails))
    except smtplib.SMTPRecipientsRefused as exc:
        raise ValueError("email: recipients refused") from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise _TransientDeliveryError(f"email: {type(exc).__name__}") from exc


@dataclass(frozen=True)
class AlertDelivery:
    status: str
    # Seconds until the next attempt, when one is due.
    retry_in_s: float | None = None


def budget_alert_deliver(*, alert_id: int, now: datetime | None = None) -> AlertDelivery:
    """One delivery attempt of an alert, to each channel that has not yet received it.

    An attempt is claimed by compare-and-swap on the alert's lease, so two workers given
    the same alert (a re-drive racing a retry) never send it twice at once; a channel
    that succeeded is recorded before anything else is retried. Transient failures are
    retried with doubling backoff, up to ALERT_MAX_ATTEMPTS in all; a permanent failure
    (an HTTP 4xx, refused recipients) is not retried.
    """
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        claimed = (
            BudgetAlert.objects.filter(pk=alert_id, status=BudgetAlert.Status.PENDING)
            .filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
            .update(
                attempts=F("attempts") + 1, last_attempt_at=now, leased_until=now + _ALERT_LEASE
            )
        )
        alert = BudgetAlert.objects.filter(pk=alert_id).first()
    if alert is None:
        return AlertDelivery(status="missing")
    if not claimed:
        return AlertDelivery(status=alert.status)
    # No transaction is open while the network is used.
    transient: list[str] = []
    permanent: list[str] = []
    delivered: dict[str, datetime] = {}
    channels = (
        ("webhook_delivered_at", bool(alert.webhook_url), _alert_webhook_send),
        ("email_delivered_at", bool(alert.emails), _alert_email_send),
    )
    for field_name, configured, send in channels:
        if not configured or getattr(alert, field_name) is not None:
            continue
        try:
            send(alert)
        except _TransientDeliveryError as exc:
            transient.append(str(exc))
        except ValueError as exc:
            permanent.append(str(exc))
        else:
            delivered[field_name] = timezone.now()
    retry = bool(transient) and alert.attempts < ALERT_MAX_ATTEMPTS
    if retry:
        status = BudgetAlert.Status.PENDING
    elif transient or permanent:
        status = BudgetAlert.Status.FAILED
    else:
        status = BudgetAlert.Status.DELIVERED
    errors = "; ".join(transient + permanent)
    with transaction.atomic(durable=True):
        BudgetAlert.objects.filter(pk=alert_id).update(
            **delivered, status=status, leased_until=None, last_error=errors
        )
    if status == BudgetAlert.Status.FAILED:
        logger.warning("budget alert %s not delivered: %s", alert_id, errors)
    if not retry:
        return AlertDelivery(status=status)
    backoff = min(2.0 ** (alert.attempts - 1), _ALERT_BACKOFF_CAP_S)
    # Full jitter on the upper half: retries of many alerts do not arrive in step.
    return AlertDelivery(status=status, retry_in_s=backoff * (0.5 + random.random() / 2))  # noqa: S311
