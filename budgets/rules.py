"""The money rules, each written once in every spelling the code needs, side by side.

A rule is needed in up to three spellings: Python (to explain a refusal, to show a user in
the console), a Django expression (the ORM statements that run on SQLite, lists that
filter and sort in SQL) and SQL (the PostgreSQL statements that move money, see
budgets/services/holds.py). Each rule's spellings sit together here, and
tests/budgets/test_money_rules.py evaluates all of them on PostgreSQL for generated inputs
and requires that they agree. Nothing else in the code may restate a rule.

SQL fragments name the user row `u` (or, for a ceiling, `c`: a ceiling keeps its money
and window in the same columns) and its budget row `b`; parameters are psycopg's
`%(name)s` placeholders. Pure: no database access here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import ClassVar

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


def limit_sql(row: str = "u") -> str:
    return (
        f"(b.max_budget_usd + CASE WHEN {row}.topup_expires_at > %(now)s"
        f" THEN {row}.topup_usd ELSE 0 END)"
    )


LIMIT_SQL = limit_sql()

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


def admits_sql(row: str = "u", limit: str = "%(limit)s::numeric") -> str:
    """`limit` is an SQL expression: the caller's loaded limit for a user; for a
    ceiling, its own (`limit_sql("c")`), read from the row that the statement locked
    first (budgets.services.holds, ADMIT)."""
    committed = f"{row}.spend_usd + {row}.reserved_usd"
    return f"({limit} IS NULL OR ({committed} < {limit} AND {committed} + %(amount)s <= {limit}))"


ADMITS_SQL = admits_sql()

# ---------------------------------------------------------------------------------------
# The period is current while its end is unset or still ahead. Money moves only in a
# current period: a due one is rolled first, under the user's lock.


def period_current(next_budget_reset_at: datetime | None, now: datetime) -> bool:
    return next_budget_reset_at is None or next_budget_reset_at > now


def period_current_q(now: datetime) -> Q:
    return Q(next_budget_reset_at__isnull=True) | Q(next_budget_reset_at__gt=now)


def period_current_sql(row: str = "u") -> str:
    return f"({row}.next_budget_reset_at IS NULL OR {row}.next_budget_reset_at > %(now)s)"


PERIOD_CURRENT_SQL = period_current_sql()

# ---------------------------------------------------------------------------------------
# The ceilings a request answers to: those of its organization, its workspace and its key,
# each either for every provider ("") or for the provider that serves the attempt. A
# scope that is None (a master-key request has no key) matches nothing.


@dataclass(frozen=True, slots=True)
class Scopes:
    """Where a request is billed besides its user: ids as the ceilings store them."""

    organization_id: str | None
    workspace_id: str | None
    api_key_id: str | None

    USER_ONLY: ClassVar[Scopes]

    def params(self, provider: str) -> dict[str, str | None]:
        return {
            "organization_scope": self.organization_id,
            "workspace_scope": self.workspace_id,
            "api_key_scope": self.api_key_id,
            "provider": provider,
        }

    def pairs(self) -> list[tuple[str, str]]:
        return [
            (scope_type, scope_id)
            for scope_type, scope_id in (
                ("organization", self.organization_id),
                ("workspace", self.workspace_id),
                ("api_token", self.api_key_id),
            )
            if scope_id is not None
        ]


# No scope: the user's own budget only (what callers outside the request path hold).
Scopes.USER_ONLY = Scopes(None, None, None)


def ceiling_applies(
    scope_type: str, scope_id: str, provider: str, scopes: Scopes, serving: str
) -> bool:
    return (scope_type, scope_id) in scopes.pairs() and provider in ("", serving)


def ceilings_applicable_q(scopes: Scopes, serving: str) -> Q:
    """On Ceiling rows."""
    scoped = Q(pk__in=[])
    for scope_type, scope_id in scopes.pairs():
        scoped |= Q(scope_type=scope_type, scope_id=scope_id)
    return scoped & Q(provider__in=["", serving])


CEILINGS_APPLICABLE_SQL = (
    "((c.scope_type = 'organization' AND c.scope_id = %(organization_scope)s)"
    " OR (c.scope_type = 'workspace' AND c.scope_id = %(workspace_scope)s)"
    " OR (c.scope_type = 'api_token' AND c.scope_id = %(api_key_scope)s))"
    " AND c.provider IN ('', %(provider)s)"
)

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
