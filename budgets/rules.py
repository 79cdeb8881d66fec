"""The money rules, each written once in every spelling the code needs, side by side.

A rule is needed in up to three spellings: Python (to explain a refusal, to show a user in
the console), a Django expression (the ORM statements that run on SQLite, lists that
filter and sort in SQL) and SQL (the PostgreSQL statements that move money, see
budgets/services/holds.py). Each rule's spellings sit together here, and
tests/budgets/test_money_rules.py evaluates all of them on PostgreSQL for generated inputs
and requires that they agree. Nothing else in the code may restate a rule.

SQL fragments name the user row `u` and its budget row `b`; parameters are psycopg's
`%(name)s` placeholders. Pure: no database access here.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db.models import Case, ExpressionWrapper, F, Q, Value, When
from django.db.models.lookups import LessThan, LessThanOrEqual

from common.fields import MoneyField

ZERO = Decimal("0")

# ---------------------------------------------------------------------------------------
# The limit: the budget's max plus a live top-up; none (uncapped) when the budget has no
# max or the user no budget. A top-up counts while its expiry is in the future.


def topup_live(topup_expires_at: datetime | None, now: datetime) -> bool:
    return topup_expires_at is not None and topup_expires_at > now


def limit_usd(
    max_budget_usd: Decimal | None,
    topup_usd: Decimal,
    topup_expires_at: datetime | None,
    now: datetime,
) -> Decimal | None:
    if max_budget_usd is None:
        return None
    if topup_live(topup_expires_at, now):
        return max_budget_usd + topup_usd
    return max_budget_usd


def limit_expression(now: datetime) -> ExpressionWrapper:
    """The limit of the users of a GatewayUser queryset (null when uncapped)."""
    live_topup = Case(
        When(topup_expires_at__gt=now, then=F("topup_usd")),
        default=Value(ZERO),
        output_field=MoneyField(),
    )
    return ExpressionWrapper(
        F("budget__max_budget_usd") + live_topup, output_field=MoneyField(null=True)
    )


LIMIT_SQL = (
    "(b.max_budget_usd + CASE WHEN u.topup_expires_at > %(now)s THEN u.topup_usd ELSE 0 END)"
)

# ---------------------------------------------------------------------------------------
# Admission: a request holding `amount` is admitted when nothing is capped, or when the
# user is below the limit and the amount fits under it. (A user at the limit is refused
# even a free request.) The limit is a constant here, as loaded with the caller: a
# condition that joined the budget row would not be re-evaluated against the latest user
# row when PostgreSQL re-checks a conditional UPDATE after waiting for the row lock.


def admits(
    spend_usd: Decimal, reserved_usd: Decimal, amount_usd: Decimal, limit: Decimal | None
) -> bool:
    if limit is None:
        return True
    committed = spend_usd + reserved_usd
    return committed < limit and committed + amount_usd <= limit


def admits_q(amount_usd: Decimal, limit: Decimal | None) -> Q:
    """The admission condition on GatewayUser rows."""
    if limit is None:
        return Q()
    committed = ExpressionWrapper(F("spend_usd") + F("reserved_usd"), output_field=MoneyField())
    after = ExpressionWrapper(committed + Value(amount_usd), output_field=MoneyField())
    return Q(LessThan(committed, Value(limit)), LessThanOrEqual(after, Value(limit)))


ADMITS_SQL = (
    "(%(limit)s::numeric IS NULL"
    " OR (u.spend_usd + u.reserved_usd < %(limit)s"
    " AND u.spend_usd + u.reserved_usd + %(amount)s <= %(limit)s))"
)

# ---------------------------------------------------------------------------------------
# The period is current while its end is unset or still ahead. Money moves only in a
# current period: a due one is rolled first, under the user's lock.


def period_current(next_budget_reset_at: datetime | None, now: datetime) -> bool:
    return next_budget_reset_at is None or next_budget_reset_at > now


def period_current_q(now: datetime) -> Q:
    return Q(next_budget_reset_at__isnull=True) | Q(next_budget_reset_at__gt=now)


PERIOD_CURRENT_SQL = "(u.next_budget_reset_at IS NULL OR u.next_budget_reset_at > %(now)s)"

# ---------------------------------------------------------------------------------------
# A user who can be billed: not deleted and not blocked.


def billable(deleted_at: datetime | None, blocked: bool) -> bool:
    return deleted_at is None and not blocked


def billable_q() -> Q:
    return Q(deleted_at__isnull=True, blocked=False)


BILLABLE_SQL = "(u.deleted_at IS NULL AND NOT u.blocked)"

# ---------------------------------------------------------------------------------------
# A budget sends alerts when it has thresholds and somewhere to send them.


def alerts_enabled(thresholds_pct: list[int], webhook_url: str, emails: list[str]) -> bool:
    return bool(thresholds_pct) and bool(webhook_url or emails)


def alerts_enabled_q(prefix: str = "") -> Q:
    """On Budget rows, or through a relation when `prefix` is given ("budget__")."""
    return ~Q(**{f"{prefix}alert_thresholds_pct": []}) & (
        ~Q(**{f"{prefix}alert_webhook_url": ""}) | ~Q(**{f"{prefix}alert_emails": []})
    )


ALERTS_ENABLED_SQL = (
    "(b.alert_thresholds_pct <> '[]'::jsonb"
    " AND (b.alert_webhook_url <> '' OR b.alert_emails <> '[]'::jsonb))"
)

# ---------------------------------------------------------------------------------------
# A key's last_used_at is for people, not accounting: it is refreshed at most once a
# minute, which keeps an UPDATE of a busy key's row off nearly every request.

KEY_TOUCH_INTERVAL_S = 60


def key_touch_due(last_used_at: datetime | None, touch_before: datetime) -> bool:
    return last_used_at is None or last_used_at < touch_before


def key_touch_due_q(touch_before: datetime) -> Q:
    return Q(last_used_at__isnull=True) | Q(last_used_at__lt=touch_before)


KEY_TOUCH_DUE_SQL = "(last_used_at IS NULL OR last_used_at < %(touch_before)s)"
