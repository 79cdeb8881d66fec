"""Holds: admission, settlement, refund, record and expiry (docs/SPEC.md §3.3, §3.4).

Each step that moves money is one statement, written once below, and it is the only code
that changes `spend`, `reserved` and holds:

- ADMIT: reserve the request's amount on the user's row and on every ceiling that applies
  (budgets.rules.Scopes), if the money fits all of them, and open its hold: all or none;
- SETTLE: close the hold, release what it reserved, add the cost (to the user and to the
  hold's ceilings), write the usage row;
- REFUND: close an open hold without charging, write the usage row;
- RECORD: write the usage row of a request that took no hold;
- EXPIRE: close an open hold past its expiry (the sweeper) and release its reservation.

The closing statements also refresh the key's `last_used_at` and, in platform mode,
write the request's attempt reports, so that everything a request changes commits at once.

Two ways to run a step, one statement:
- The fast path sends the statement alone from the event loop (one round trip on the
  pooled connection). Its conditions (user billable, period current, money fits, hold
  open) are re-checked by PostgreSQL under the row locks; when one does not hold, the
  statement changes nothing.
- The general path then takes the row locks in the fixed order (hold, user, ceilings by
  id), rolls a period that has ended, and runs the same statement inside its
  transaction. Python only reads, to say why a request was refused.

Lock order, in every statement and transaction: the hold, then the user, then the
ceilings in id order. The statements below force it: each ceiling CTE reads the user's
CTE first and locks its ceilings with an ordered SELECT ... FOR NO KEY UPDATE.
On SQLite (the embedded default, one writer at a time) each statement runs in its ORM
spelling, written next to its SQL and built from the same rules (budgets/rules.py);
tests/budgets/test_money_rules.py runs both spellings on PostgreSQL and compares them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from budgets import rules, selectors
from budgets.exceptions import BudgetExceeded, UnknownUser, UserBlocked
from budgets.models import APIKey, Ceiling, GatewayUser, Hold, HoldCeiling
from budgets.rules import Scopes
from budgets.services.periods import period_roll_locked
from common import pgpool
from usage import ledger
from usage.ledger import UsageRecord

ZERO = Decimal("0")


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

    @property
    def used_pct(self) -> Decimal | None:
        """Percent of the limit committed (spend + reserved); a limit of 0 is all used."""
        if self.limit_usd is None:
            return None
        if not self.limit_usd:
            return Decimal(100)
        return (self.spend_usd + self.reserved_usd) * 100 / self.limit_usd

    @classmethod
    def of(cls, user: GatewayUser | Ceiling, now: datetime) -> BudgetState:
        """A user's or a ceiling's state (its budget loaded)."""
        budget = user.budget
        return cls(
            spend_usd=user.spend_usd,
            reserved_usd=user.reserved_usd,
            limit_usd=rules.limit_usd(
                budget.max_budget_usd if budget else None,
                user.topup_usd,
                user.topup_expires_at,
                now,
            ),
            next_reset_at=user.next_budget_reset_at,
        )


def _state(row: dict[str, Any], limit_usd: Decimal | None) -> BudgetState:
    return BudgetState(
        spend_usd=row["spend_usd"],
        reserved_usd=row["reserved_usd"],
        limit_usd=limit_usd,
        next_reset_at=row["next_budget_reset_at"],
    )


# ---------------------------------------------------------------------------------------
# Running a statement


@dataclass(frozen=True)
class Statement:
    """One money-moving step: its PostgreSQL text, and its ORM spelling for SQLite (a
    function of the same parameters, returning the same row or None)."""

    sql: str
    orm: Callable[[dict[str, Any], UsageRecord | None], dict[str, Any] | None]

    def run(self, params: dict[str, Any], record: UsageRecord | None = None) -> dict | None:
        """Run inside the caller's transaction (the general path)."""
        if connection.vendor != "postgresql":
            return self.orm(params, record)
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            row = cursor.fetchone()
            if row is None:
                return None
            return dict(zip((c.name for c in cursor.description), row, strict=True))


def _fast_path() -> bool:
    return pgpool.enabled() and settings.OTARI_MONEY_FAST_PATH


def _closing_params(record: UsageRecord, now: datetime, **extra: Any) -> dict[str, Any]:
    return {
        **record.params(now),
        "touch_before": now - timedelta(seconds=rules.KEY_TOUCH_INTERVAL_S),
        **extra,
    }


def _reports_enqueue_on_commit(record: UsageRecord) -> None:
    # The ORM spelling registers its own (usage.ledger.row_create).
    if record.reports and connection.vendor == "postgresql":
        transaction.on_commit(lambda: ledger.reports_enqueue(record))


# ---------------------------------------------------------------------------------------
# The closing statements' shared parts


# The key's last_used_at, at most once a minute. SKIP LOCKED: two closing statements of
# one key can each hold the row the other needs next (the user's, the key's); the touch
# is bookkeeping, so it gives way instead of waiting, which deadlocked (found by
# tests/observability, two requests of one key).
_TOUCH_KEY_SQL = f"""
touched AS (
    UPDATE budgets_apikey SET last_used_at = %(now)s
    WHERE id = (
        SELECT id FROM budgets_apikey
        WHERE id = %(api_key_id)s AND {rules.KEY_TOUCH_DUE_SQL}
        FOR NO KEY UPDATE SKIP LOCKED)
)"""


def _touch_key_orm(params: dict[str, Any]) -> None:
    if params["api_key_id"] is not None:
        APIKey.objects.filter(rules.key_touch_due_q(params["touch_before"])).filter(
            pk=params["api_key_id"]
        ).update(last_used_at=params["now"])


def _closing(sql: str, *, reports_condition: str = "") -> tuple[str, str]:
    """A closing statement without and with the request's attempt reports."""
    reports = f", reported AS ({ledger.reports_insert_sql(reports_condition)})"
    return sql.replace("{reports}", ""), sql.replace("{reports}", reports)


# The usage row of a statement that moves no period: stamped now.
_LOGGED_NOW_SQL = ledger.insert_sql(timestamp="%(now)s")


# ---------------------------------------------------------------------------------------
# ADMIT


# The user's row is locked first (`payer`), then the ceilings that apply, in id order;
# `fits` is computed on each ceiling's latest row, once locked (READ COMMITTED re-reads a
# row a concurrent statement changed before locking it). The user's UPDATE goes ahead only
# when every ceiling fits, and then the ceilings are reserved and linked to the hold.
_ADMIT_SQL = f"""
WITH payer AS MATERIALIZED (
    SELECT u.user_id, u.spend_usd, u.reserved_usd, u.next_budget_reset_at, u.deleted_at,
           u.blocked
    FROM budgets_gatewayuser u
    WHERE u.user_id = %(user_id)s
    FOR NO KEY UPDATE
), ceilings AS MATERIALIZED (
    SELECT c.id,
           ({rules.period_current_sql("c")}
            AND {rules.admits_sql("c", rules.limit_sql("c"))}) AS fits
    FROM payer, budgets_ceiling c JOIN budgets_budget b ON b.budget_id = c.budget_id
    WHERE {rules.CEILINGS_APPLICABLE_SQL}
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
), admitted AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd + %(amount)s
    WHERE u.user_id = %(user_id)s
      AND {rules.BILLABLE_SQL} AND {rules.PERIOD_CURRENT_SQL} AND {rules.ADMITS_SQL}
      AND NOT EXISTS (SELECT 1 FROM ceilings WHERE NOT ceilings.fits)
    RETURNING u.spend_usd, u.reserved_usd, u.next_budget_reset_at
), held AS (
    INSERT INTO budgets_hold
        (request_id, user_id, amount_usd, status, model_key, created_at, expires_at)
    SELECT %(request_id)s, %(user_id)s, %(amount)s, 'open', %(model_key)s, %(now)s,
           %(expires_at)s
    FROM admitted
), ceilings_reserved AS (
    UPDATE budgets_ceiling AS c
    SET reserved_usd = c.reserved_usd + %(amount)s
    FROM ceilings k, admitted
    WHERE c.id = k.id
), linked AS (
    INSERT INTO budgets_holdceiling (hold_id, ceiling_id)
    SELECT %(request_id)s, k.id FROM ceilings k, admitted
)
SELECT * FROM admitted
"""


def _ceilings_fit(ceilings: list[Ceiling], amount: Decimal, now: datetime) -> Ceiling | None:
    """The first ceiling (in lock order) that does not admit `amount`, or None."""
    for ceiling in ceilings:
        if not rules.period_current(ceiling.next_budget_reset_at, now) or not rules.admits(
            ceiling.spend_usd,
            ceiling.reserved_usd,
            amount,
            BudgetState.of(ceiling, now).limit_usd,
        ):
            return ceiling
    return None


def _applicable(p: dict[str, Any]) -> list[Ceiling]:
    scopes = Scopes(p["organization_scope"], p["workspace_scope"], p["api_key_scope"])
    return list(
        Ceiling.objects.filter(rules.ceilings_applicable_q(scopes, p["provider"]))
        .select_related("budget")
        .order_by("pk")
    )


def _ceilings_move(
    ceiling_ids: list[Any], *, reserved: Decimal = ZERO, spend: Decimal = ZERO
) -> None:
    """The ORM spelling of a statement's ceiling UPDATE."""
    Ceiling.objects.filter(pk__in=ceiling_ids).update(
        reserved_usd=F("reserved_usd") + reserved,
        spend_usd=F("spend_usd") + spend,
        lifetime_spend_usd=F("lifetime_spend_usd") + spend,
    )


def _linked_ids(request_id: uuid.UUID) -> list[Any]:
    return list(HoldCeiling.objects.filter(hold_id=request_id).values_list("ceiling_id", flat=True))


def _admit_orm(p: dict[str, Any], _: UsageRecord | None) -> dict[str, Any] | None:
    ceilings = _applicable(p)
    if _ceilings_fit(ceilings, p["amount"], p["now"]) is not None:
        return None
    admitted = (
        GatewayUser.objects.filter(pk=p["user_id"])
        .filter(rules.billable_q(), rules.period_current_q(p["now"]))
        .filter(rules.admits_q(p["amount"], p["limit"]))
        .update(reserved_usd=F("reserved_usd") + p["amount"])
    )
    if not admitted:
        return None
    Hold.objects.create(
        request_id=p["request_id"],
        user_id=p["user_id"],
        amount_usd=p["amount"],
        model_key=p["model_key"],
        created_at=p["now"],
        expires_at=p["expires_at"],
    )
    _ceilings_move([c.pk for c in ceilings], reserved=p["amount"])
    HoldCeiling.objects.bulk_create(
        [HoldCeiling(hold_id=p["request_id"], ceiling=c) for c in ceilings]
    )
    return (
        GatewayUser.objects.filter(pk=p["user_id"])
        .values("spend_usd", "reserved_usd", "next_budget_reset_at")
        .get()
    )


ADMIT = Statement(_ADMIT_SQL, _admit_orm)

# ADMIT for a caller a gateway process kept from an earlier request (llm_proxy.auth): it
# also requires that the caller's configuration is still the one kept (its fingerprint,
# budgets.selectors), recomputed from the current rows under the same statement, so that
# a key revoked, a user blocked, a budget or a price changed since counts for this
# request as if the caller had just been loaded. PostgreSQL only (the fast path).
#
# When it takes nothing, and the caller is still the one kept, it returns the user's money
# as locked (`payer` holds the row's latest version) marked `refused`: from it, Python
# tells a refusal for the user's budget (billable, period current, and the money does not
# fit: budgets.rules' Python twins of the conditions above) from anything else (a period
# to roll, a ceiling that does not fit), and explains it. No row: the caller changed, and
# the request is admitted again from a fresh load. The fingerprint is computed once
# (`kept`), and the statement stays under psycopg's limit for caching a query's
# conversion (common.pgpool.CACHED_STATEMENT_MAX_BYTES).
_ADMIT_CHECKED_SQL = (
    _ADMIT_SQL.replace(
        "WITH payer AS MATERIALIZED (",
        "WITH kept AS MATERIALIZED (\n"
        f"    SELECT ({selectors.KEY_CALLER_FINGERPRINT_SQL}) = %(fingerprint)s AS current\n"
        "), payer AS MATERIALIZED (",
    )
    .replace(
        "AND NOT EXISTS (SELECT 1 FROM ceilings WHERE NOT ceilings.fits)",
        "AND NOT EXISTS (SELECT 1 FROM ceilings WHERE NOT ceilings.fits)\n"
        "      AND (SELECT current FROM kept)",
    )
    .replace(
        "\nSELECT * FROM admitted\n",
        """
SELECT false AS refused, a.*, NULL::timestamptz AS deleted_at, NULL::boolean AS blocked
FROM admitted a
UNION ALL
SELECT true, u.spend_usd, u.reserved_usd, u.next_budget_reset_at, u.deleted_at, u.blocked
FROM payer u
WHERE NOT EXISTS (SELECT 1 FROM admitted) AND (SELECT current FROM kept)
""",
    )
)
assert "AND (SELECT current FROM kept)" in _ADMIT_CHECKED_SQL  # noqa: S101 - anchors in ADMIT
assert "UNION ALL" in _ADMIT_CHECKED_SQL  # noqa: S101


class CallerUnverified(Exception):
    """ADMIT_CHECKED took nothing, and not only for the user's money: the kept caller
    changed, a period is due, or a ceiling does not fit. The request is admitted again
    from a fresh load."""


class CheckedRefusal(BudgetExceeded):
    """ADMIT_CHECKED's refusal: the kept caller is current, and the money does not fit
    its user's budget. `state` is the user's money on the locked row."""


def _admit_params(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    limit_usd: Decimal | None,
    model_key: str,
    scopes: Scopes,
    provider: str,
    now: datetime,
) -> dict[str, Any]:
    return {
        **scopes.params(provider),
        "user_id": user_id,
        "request_id": request_id,
        "amount": amount_usd,
        "limit": limit_usd,
        "model_key": model_key,
        "now": now,
        "expires_at": now + timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS),
    }


def hold_open(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    model_key: str,
    now: datetime,
    scopes: Scopes = Scopes.USER_ONLY,
    provider: str = "",
) -> BudgetState:
    """Reserve `amount_usd` for a request on its user and on every ceiling that applies,
    or raise why not (general path).

    Rolls ended periods first. Refuses when the user is gone or blocked, or when the
    money does not fit the user's budget or a ceiling (budgets.rules.admits); the
    refusal names the level.
    """
    with transaction.atomic(durable=True):
        user = selectors.user_lock(user_id)
        if user.is_deleted:
            raise UnknownUser
        period_roll_locked(user, now)
        if user.blocked:
            raise UserBlocked
        state = BudgetState.of(user, now)
        if not rules.admits(user.spend_usd, user.reserved_usd, amount_usd, state.limit_usd):
            raise BudgetExceeded(state=state, needed_usd=amount_usd)
        params = _admit_params(
            user_id=user_id,
            request_id=request_id,
            amount_usd=amount_usd,
            limit_usd=state.limit_usd,
            model_key=model_key,
            scopes=scopes,
            provider=provider,
            now=now,
        )
        ceilings = selectors.ceilings_lock([c.pk for c in _applicable(params)])
        for ceiling in ceilings:
            period_roll_locked(ceiling, now)
        refusing = _ceilings_fit(ceilings, amount_usd, now)
        if refusing is not None:
            raise BudgetExceeded(
                state=BudgetState.of(refusing, now), needed_usd=amount_usd, level=refusing.level
            )
        row = ADMIT.run(params)
        if row is None:
            raise BudgetExceeded(state=state, needed_usd=amount_usd)
        return _state(row, state.limit_usd)


async def hold_open_async(
    *,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    limit_usd: Decimal | None,
    model_key: str,
    now: datetime,
    scopes: Scopes = Scopes.USER_ONLY,
    provider: str = "",
) -> BudgetState:
    """`hold_open` for the request path: ADMIT alone, with the limit as loaded with the
    caller (see budgets.rules, admission), and the general path when it changed nothing
    (user blocked or gone, period due, money does not fit: the general path rolls the
    period or names the refusal)."""
    if _fast_path():
        params = _admit_params(
            user_id=user_id,
            request_id=request_id,
            amount_usd=amount_usd,
            limit_usd=limit_usd,
            model_key=model_key,
            scopes=scopes,
            provider=provider,
            now=now,
        )
        row = await pgpool.fetchone(ADMIT.sql, params)
        if row is not None:
            return _state(row, limit_usd)
    return await sync_to_async(hold_open)(
        user_id=user_id,
        request_id=request_id,
        amount_usd=amount_usd,
        model_key=model_key,
        scopes=scopes,
        provider=provider,
        now=now,
    )


async def hold_open_checked(
    *,
    fingerprint: str,
    key_hash: str,
    user_id: str,
    request_id: uuid.UUID,
    amount_usd: Decimal,
    limit_usd: Decimal | None,
    model_key: str,
    now: datetime,
    scopes: Scopes,
    provider: str,
) -> BudgetState:
    """`hold_open_async` for a kept caller: ADMIT_CHECKED alone, one round trip. Raises
    CheckedRefusal when the money does not fit the user's budget, and CallerUnverified
    when it took nothing for any other reason (there is no general path to fall back on:
    the caller itself may be out of date)."""
    params = _admit_params(
        user_id=user_id,
        request_id=request_id,
        amount_usd=amount_usd,
        limit_usd=limit_usd,
        model_key=model_key,
        scopes=scopes,
        provider=provider,
        now=now,
    )
    row = await pgpool.fetchone(
        _ADMIT_CHECKED_SQL, {**params, "fingerprint": fingerprint, "key_hash": key_hash}
    )
    if row is None:
        raise CallerUnverified
    state = _state(row, limit_usd)
    if not row["refused"]:
        return state
    if (
        rules.billable(row["deleted_at"], row["blocked"])
        and rules.period_current(row["next_budget_reset_at"], now)
        and not rules.admits(row["spend_usd"], row["reserved_usd"], amount_usd, limit_usd)
    ):
        raise CheckedRefusal(state=state, needed_usd=amount_usd)
    raise CallerUnverified


def caller_reuse_enabled() -> bool:
    """Whether the request path may keep callers across requests (ADMIT_CHECKED)."""
    return _fast_path() and settings.OTARI_CALLER_REUSE


# ---------------------------------------------------------------------------------------
# MOVE: a request failing over to another attempt takes its hold along. The hold grows
# to the next attempt's estimate when that is dearer (a cheaper attempt keeps the larger
# hold until settlement), on the user and on every ceiling it stays on; and it leaves the
# ceilings narrowed to the provider it leaves for those narrowed to the one it tries
# next. All of it fits, or nothing changes and the request stops with the refusal. Rare
# (a failover): one transaction under the locks, in the lock order (hold, user, ceilings
# by id), in its ORM spelling on every database.


def hold_move(
    *,
    request_id: uuid.UUID,
    scopes: Scopes,
    provider: str,
    amount_usd: Decimal,
    model_key: str,
    now: datetime,
) -> None:
    """Hold `amount_usd` (at least what is held) for the attempt at `provider`; raise
    BudgetExceeded, naming the level, when it does not fit, leaving the hold as it was."""
    with transaction.atomic(durable=True):
        hold = Hold.objects.select_for_update().filter(pk=request_id, status="open").first()
        if hold is None:
            return
        held = hold.amount_usd
        grow = max(ZERO, amount_usd - held)
        linked = set(_linked_ids(request_id))
        wanted = {c.pk for c in _applicable(scopes.params(provider))}
        leaving, joining, staying = linked - wanted, wanted - linked, linked & wanted
        if not grow and not leaving and not joining:
            return
        if grow:
            user = selectors.user_lock(hold.user_id)
            period_roll_locked(user, now)
            state = BudgetState.of(user, now)
            if not rules.admits(user.spend_usd, user.reserved_usd, grow, state.limit_usd):
                raise BudgetExceeded(state=state, needed_usd=amount_usd)
        ceilings = selectors.ceilings_lock(leaving | joining | (staying if grow else set()))
        for ceiling in ceilings:
            if ceiling.pk not in leaving:
                period_roll_locked(ceiling, now)
        refusing = _ceilings_fit(
            [c for c in ceilings if c.pk in joining], held + grow, now
        ) or _ceilings_fit([c for c in ceilings if c.pk in staying], grow, now)
        if refusing is not None:
            raise BudgetExceeded(
                state=BudgetState.of(refusing, now), needed_usd=amount_usd, level=refusing.level
            )
        if grow:
            GatewayUser.objects.filter(pk=hold.user_id).update(
                reserved_usd=F("reserved_usd") + grow
            )
            _ceilings_move(list(staying), reserved=grow)
        _ceilings_move(list(leaving), reserved=-held)
        HoldCeiling.objects.filter(hold=hold, ceiling_id__in=leaving).delete()
        _ceilings_move(list(joining), reserved=held + grow)
        HoldCeiling.objects.bulk_create(
            [HoldCeiling(hold=hold, ceiling=c) for c in ceilings if c.pk in joining]
        )
        Hold.objects.filter(pk=request_id).update(amount_usd=held + grow, model_key=model_key)


# ---------------------------------------------------------------------------------------
# SETTLE. `from_status` is the hold's status being closed: "open" (its reservation is
# released) or "expired" (the sweeper got there first and released it: only the cost is
# added). The usage row is stamped no earlier than the current window's start, so
# invariant 2 holds even when the general path rolled the period just before.


# The usage row is stamped no earlier than the start of the windows it was charged into
# (the user's and its ceilings'), so that every window's spend is the sum of its rows.
_SETTLE_LOGGED_SQL = ledger.insert_sql(
    timestamp=(
        "GREATEST(%(now)s, charged.budget_started_at,"
        " (SELECT max(budget_started_at) FROM ceilings_charged))"
    ),
    source="FROM charged",
)


def _ceilings_closing_sql(after: str, released: str, charge: str = "0") -> str:
    """The CTEs that close a hold's ceilings: lock them in id order once `after` (the
    user's CTE) has run, then release `released` and add `charge` to each."""
    return f"""
ceilings_locked AS MATERIALIZED (
    SELECT c.id
    FROM {after} x, budgets_holdceiling l JOIN budgets_ceiling c ON c.id = l.ceiling_id
    WHERE l.hold_id = %(request_id)s
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
), ceilings_charged AS (
    UPDATE budgets_ceiling AS c
    SET reserved_usd = c.reserved_usd - {released},
        spend_usd = c.spend_usd + {charge},
        lifetime_spend_usd = c.lifetime_spend_usd + {charge}
    FROM ceilings_locked k
    WHERE c.id = k.id
    RETURNING c.budget_started_at
)"""


_SETTLE_SQL, _SETTLE_REPORTED_SQL = _closing(
    f"""
WITH closed AS (
    UPDATE budgets_hold AS h
    SET status = 'settled', closed_at = %(now)s
    WHERE h.request_id = %(request_id)s AND h.status = %(from_status)s
      AND EXISTS (
          SELECT 1 FROM budgets_gatewayuser u
          WHERE u.user_id = h.user_id AND {rules.PERIOD_CURRENT_SQL})
      AND NOT EXISTS (
          SELECT 1
          FROM budgets_holdceiling l JOIN budgets_ceiling c ON c.id = l.ceiling_id
          WHERE l.hold_id = h.request_id AND NOT {rules.period_current_sql("c")})
    RETURNING h.user_id,
              CASE WHEN %(from_status)s = 'open' THEN h.amount_usd ELSE 0 END AS released
), charged AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd - closed.released,
        spend_usd = u.spend_usd + %(charge_usd)s,
        lifetime_spend_usd = u.lifetime_spend_usd + %(charge_usd)s
    FROM closed
    WHERE u.user_id = closed.user_id
    RETURNING u.spend_usd, u.reserved_usd, u.next_budget_reset_at, u.budget_started_at,
              u.budget_id, u.topup_usd, u.topup_expires_at
), {_ceilings_closing_sql("charged", "(SELECT released FROM closed)", "%(charge_usd)s")},
logged AS (
    {_SETTLE_LOGGED_SQL}
), {_TOUCH_KEY_SQL}{{reports}}
SELECT u.spend_usd, u.reserved_usd, u.next_budget_reset_at, {rules.LIMIT_SQL} AS limit_usd
FROM charged AS u LEFT JOIN budgets_budget b ON b.budget_id = u.budget_id
""",
    # The reports only when this statement settled (and so wrote the usage row);
    # otherwise the general path writes both.
    reports_condition="WHERE EXISTS (SELECT 1 FROM charged)",
)


def _settle_orm(p: dict[str, Any], record: UsageRecord | None) -> dict[str, Any] | None:
    current_users = GatewayUser.objects.filter(rules.period_current_q(p["now"]))
    hold = Hold.objects.filter(
        pk=p["request_id"], status=p["from_status"], user__in=current_users
    ).first()
    ceilings = list(Ceiling.objects.filter(hold_links__hold_id=p["request_id"]))
    if any(not rules.period_current(c.next_budget_reset_at, p["now"]) for c in ceilings):
        return None
    if hold is None or not (
        Hold.objects.filter(pk=hold.pk, status=p["from_status"]).update(
            status=Hold.Status.SETTLED, closed_at=p["now"]
        )
    ):
        return None
    released = hold.amount_usd if p["from_status"] == Hold.Status.OPEN else ZERO
    GatewayUser.objects.filter(pk=hold.user_id).update(
        reserved_usd=F("reserved_usd") - released,
        spend_usd=F("spend_usd") + p["charge_usd"],
        lifetime_spend_usd=F("lifetime_spend_usd") + p["charge_usd"],
    )
    _ceilings_move([c.pk for c in ceilings], reserved=-released, spend=p["charge_usd"])
    user = GatewayUser.objects.select_related("budget").get(pk=hold.user_id)
    starts = [user.budget_started_at, *(c.budget_started_at for c in ceilings)]
    ledger.row_create(record, p, max([p["now"], *(s for s in starts if s is not None)]))
    _touch_key_orm(p)
    state = BudgetState.of(user, p["now"])
    return {
        "spend_usd": state.spend_usd,
        "reserved_usd": state.reserved_usd,
        "next_budget_reset_at": state.next_reset_at,
        "limit_usd": state.limit_usd,
    }


SETTLE = Statement(_SETTLE_SQL, _settle_orm)
SETTLE_REPORTED = Statement(_SETTLE_REPORTED_SQL, _settle_orm)


def _settle_statement(record: UsageRecord) -> Statement:
    return SETTLE_REPORTED if record.reports else SETTLE


def hold_settle(*, record: UsageRecord, now: datetime) -> BudgetState | None:
    """Charge a finished request and release its hold (general path).

    Open hold: release it and add the cost. Expired hold: only add the cost. Settled or
    refunded: the request was already closed; do nothing (None).
    """
    with transaction.atomic(durable=True):
        hold = Hold.objects.select_for_update().filter(pk=record.request_id).first()
        if hold is None or hold.status in (Hold.Status.SETTLED, Hold.Status.REFUNDED):
            return None
        # Holds are never deleted and users only softly: the user row exists.
        user = selectors.user_lock(hold.user_id)
        period_roll_locked(user, now)
        for ceiling in selectors.ceilings_lock(_linked_ids(record.request_id)):
            period_roll_locked(ceiling, now)
        row = _settle_statement(record).run(
            _closing_params(record, now, from_status=hold.status), record
        )
        _reports_enqueue_on_commit(record)
        return _state(row, row["limit_usd"]) if row else None


async def hold_settle_async(*, record: UsageRecord, now: datetime) -> BudgetState | None:
    """`hold_settle` for the request path: SETTLE alone when the hold is open and the
    period current; otherwise it changes nothing and the general path settles."""
    if _fast_path():
        row = await pgpool.fetchone(
            _settle_statement(record).sql, _closing_params(record, now, from_status="open")
        )
        if row is not None:
            if record.reports:
                ledger.reports_enqueue(record)
            return _state(row, row["limit_usd"])
    return await sync_to_async(hold_settle)(record=record, now=now)


# ---------------------------------------------------------------------------------------
# REFUND: an open hold is released without a charge; a hold no longer open is left
# alone. The usage row is written either way (at most once).


_REFUND_SQL, _REFUND_REPORTED_SQL = _closing(
    f"""
WITH released AS (
    UPDATE budgets_hold SET status = 'refunded', closed_at = %(now)s
    WHERE request_id = %(request_id)s AND status = 'open'
    RETURNING user_id, amount_usd
), unreserved AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd - released.amount_usd
    FROM released
    WHERE u.user_id = released.user_id
    RETURNING u.user_id
), {_ceilings_closing_sql("unreserved", "(SELECT amount_usd FROM released)")},
logged AS (
    {_LOGGED_NOW_SQL}
), {_TOUCH_KEY_SQL}{{reports}}
SELECT 1 AS done
"""
)


def _refund_orm(p: dict[str, Any], record: UsageRecord | None) -> dict[str, Any]:
    hold = Hold.objects.filter(pk=p["request_id"], status=Hold.Status.OPEN).first()
    if hold is not None and (
        Hold.objects.filter(pk=hold.pk, status=Hold.Status.OPEN).update(
            status=Hold.Status.REFUNDED, closed_at=p["now"]
        )
    ):
        GatewayUser.objects.filter(pk=hold.user_id).update(
            reserved_usd=F("reserved_usd") - hold.amount_usd
        )
        _ceilings_move(_linked_ids(hold.pk), reserved=-hold.amount_usd)
    return _record_orm(p, record)


REFUND = Statement(_REFUND_SQL, _refund_orm)
REFUND_REPORTED = Statement(_REFUND_REPORTED_SQL, _refund_orm)


# ---------------------------------------------------------------------------------------
# RECORD: the usage row of a request that took no hold (refused, free, unpriced or
# excluded from budget).


_RECORD_SQL, _RECORD_REPORTED_SQL = _closing(
    f"""
WITH logged AS (
    {_LOGGED_NOW_SQL}
), {_TOUCH_KEY_SQL}{{reports}}
SELECT 1 AS done
"""
)


def _record_orm(p: dict[str, Any], record: UsageRecord | None) -> dict[str, Any]:
    ledger.row_create(record, p, p["now"])
    _touch_key_orm(p)
    return {"done": 1}


RECORD = Statement(_RECORD_SQL, _record_orm)
RECORD_REPORTED = Statement(_RECORD_REPORTED_SQL, _record_orm)


def _close(plain: Statement, reported: Statement, record: UsageRecord, now: datetime) -> None:
    """Run a closing statement that depends on no period (REFUND, RECORD)."""
    statement = reported if record.reports else plain
    with transaction.atomic(durable=True):
        statement.run(_closing_params(record, now), record)
        _reports_enqueue_on_commit(record)


async def _close_async(
    plain: Statement, reported: Statement, record: UsageRecord, now: datetime
) -> None:
    if _fast_path():
        statement = reported if record.reports else plain
        await pgpool.fetchone(statement.sql, _closing_params(record, now))
        if record.reports:
            ledger.reports_enqueue(record)
        return
    await sync_to_async(_close)(plain, reported, record, now)


def hold_refund(*, record: UsageRecord, now: datetime) -> None:
    """Release a failed request's hold without charging, and log the failure."""
    _close(REFUND, REFUND_REPORTED, record, now)


async def hold_refund_async(*, record: UsageRecord, now: datetime) -> None:
    await _close_async(REFUND, REFUND_REPORTED, record, now)


def usage_record(*, record: UsageRecord, now: datetime) -> None:
    """Log a request that took no hold."""
    _close(RECORD, RECORD_REPORTED, record, now)


async def usage_record_async(*, record: UsageRecord, now: datetime) -> None:
    await _close_async(RECORD, RECORD_REPORTED, record, now)


# ---------------------------------------------------------------------------------------
# EXPIRE: one open hold past its expiry. SKIP LOCKED: a hold being settled or refunded
# right now is left to that request; exactly one of them moves it from open.


_EXPIRE_SQL = f"""
WITH expired AS (
    UPDATE budgets_hold SET status = 'expired', closed_at = %(now)s
    WHERE request_id = (
        SELECT request_id FROM budgets_hold
        WHERE request_id = %(request_id)s AND status = 'open' AND expires_at <= %(now)s
        FOR UPDATE SKIP LOCKED)
    RETURNING user_id, amount_usd
), unreserved AS (
    UPDATE budgets_gatewayuser AS u
    SET reserved_usd = u.reserved_usd - expired.amount_usd
    FROM expired
    WHERE u.user_id = expired.user_id
    RETURNING u.user_id
), {_ceilings_closing_sql("unreserved", "(SELECT amount_usd FROM expired)")}
SELECT 1 AS done FROM unreserved
"""


def _expire_orm(p: dict[str, Any], _: UsageRecord | None) -> dict[str, Any] | None:
    hold = Hold.objects.filter(
        pk=p["request_id"], status=Hold.Status.OPEN, expires_at__lte=p["now"]
    ).first()
    if hold is None or not (
        Hold.objects.filter(pk=hold.pk, status=Hold.Status.OPEN).update(
            status=Hold.Status.EXPIRED, closed_at=p["now"]
        )
    ):
        return None
    GatewayUser.objects.filter(pk=hold.user_id).update(
        reserved_usd=F("reserved_usd") - hold.amount_usd
    )
    _ceilings_move(_linked_ids(hold.pk), reserved=-hold.amount_usd)
    return {"done": 1}


EXPIRE = Statement(_EXPIRE_SQL, _expire_orm)


def hold_expire(*, request_id: uuid.UUID, now: datetime) -> bool:
    """Expire one open hold past its expiry and release its reservation."""
    with transaction.atomic(durable=True):
        return EXPIRE.run({"request_id": request_id, "now": now}) is not None


def holds_expire_stale(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """The sweeper: expire every open hold past `expires_at` (process death, §3.4)."""
    now = now or timezone.now()
    expired = 0
    while True:
        due = list(
            selectors.holds_stale(now=now)
            .order_by("expires_at")
            .values_list("request_id", flat=True)[:batch_size]
        )
        expired += sum(hold_expire(request_id=request_id, now=now) for request_id in due)
        if len(due) < batch_size:
            return expired
