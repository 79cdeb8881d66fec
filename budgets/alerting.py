"""Budget alert arithmetic: pure functions, no I/O (the hot path calls `thresholds_crossed`).

A threshold is a whole percent of the user's limit (the budget's max plus a live top-up).
A threshold is *reached* when spend >= limit x percent / 100. Settlement adds a request's
cost to spend in one locked statement, so exactly one settlement sees spend go from below
a threshold to at or above it: that one *crosses* it, and only a crossing does any
database work. Everything else (limit edits, expired top-ups, a process that died between
the settle and the alert) is caught by the periodic check (budgets.services
`budget_alerts_sweep`), which looks at *reached* thresholds instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

# An alert at 1000% of the limit is as far as it is useful to go: spend only exceeds the
# limit by what a request's actual cost exceeded its estimate.
MAX_THRESHOLD_PCT = 1000
MAX_THRESHOLDS = 10
MAX_EMAILS = 20
_HUNDRED = Decimal(100)


def threshold_usd(limit_usd: Decimal, threshold_pct: int) -> Decimal:
    return limit_usd * threshold_pct / _HUNDRED


def thresholds_reached(
    thresholds_pct: Iterable[int],
    *,
    spend_usd: Decimal,
    limit_usd: Decimal | None,
    refused: bool = False,
) -> list[int]:
    """The thresholds at or below the current spend (none without a positive limit). A
    user refused for budget in the window has reached 100% of it, whatever the spend:
    the refused request would have taken it there."""
    if limit_usd is None or limit_usd <= 0:
        return []
    if refused:
        spend_usd = max(spend_usd, limit_usd)
    return sorted(t for t in thresholds_pct if spend_usd >= threshold_usd(limit_usd, t))


def thresholds_crossed(
    thresholds_pct: Iterable[int],
    *,
    spend_after_usd: Decimal,
    charge_usd: Decimal,
    limit_usd: Decimal | None,
) -> list[int]:
    """The thresholds a settlement that charged `charge_usd` took spend across."""
    if not charge_usd or limit_usd is None or limit_usd <= 0:
        return []
    before = spend_after_usd - charge_usd
    return sorted(
        t for t in thresholds_pct if before < threshold_usd(limit_usd, t) <= spend_after_usd
    )


def clean_thresholds(value: object) -> list[int]:
    """Validate alert thresholds: whole percents in 1..1000, at most ten, sorted, unique."""
    if not isinstance(value, list | tuple):
        raise ValidationError("alert thresholds must be a list of percentages")
    if len(value) > MAX_THRESHOLDS:
        raise ValidationError(f"at most {MAX_THRESHOLDS} alert thresholds")
    cleaned = set()
    for item in value:
        # bool is an int subclass; `true` is not a percentage.
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValidationError("alert thresholds must be whole percentages")
        if not 1 <= item <= MAX_THRESHOLD_PCT:
            raise ValidationError(f"alert thresholds must be between 1 and {MAX_THRESHOLD_PCT}")
        cleaned.add(item)
    return sorted(cleaned)


def clean_webhook_url(value: object) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > 2000:
        raise ValidationError("the alert webhook must be an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("the alert webhook must be an http(s) URL")
    return value


def clean_emails(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or len(value) > MAX_EMAILS:
        raise ValidationError(f"alert emails must be a list of at most {MAX_EMAILS} addresses")
    cleaned: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValidationError("alert emails must be email addresses")
        validate_email(item)
        if item not in cleaned:
            cleaned.append(item)
    return cleaned
