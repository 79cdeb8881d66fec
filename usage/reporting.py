"""Platform usage reports: what one report says, and the delivery policy (docs/SPEC.md §7).

Pure: no database and no network here. The outbox rows are written with the request's
usage row (budgets.services), and delivered by usage.services.usage_report_deliver,
which asks this module what a platform answer means and when to try again.

The policy, explicitly (docs/PLATFORM.md):

- 2xx: delivered.
- NON_RETRYABLE_STATUSES: dead-lettered at once, with the status and the body kept. A
  402 (the user's wallet is overdrawn) or a 401 (the gateway's token was revoked) would
  answer the same to every retry: hammering the platform with them helps nobody.
- Timeouts, connection errors, RETRYABLE_STATUSES and every 5xx: retried, the first retry
  after about one backoff unit (1 s), each later one after twice as long, with jitter; a
  `Retry-After` overrides the delay. At most `max_tries` tries in all, then dead-lettered.
- Any other status (other 4xx, a 3xx, which is never followed): dead-lettered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from usage.pricing import TokenUsage

# Permanent rejections: never retried.
NON_RETRYABLE_STATUSES = frozenset({401, 402, 404, 409, 410, 422})
# Transient, besides every 5xx: request timeout, too early, too many requests.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# A Retry-After beyond this is taken as this: a platform asking for a day's pause would
# otherwise park the report past every re-drive and operator's patience.
RETRY_AFTER_MAX_S = 3600.0
# What of the platform's answer is kept on a row (and shown in the admin).
LAST_ERROR_MAX_CHARS = 1000


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


def verdict_for_status(status: int) -> Verdict:
    """What an HTTP status from `POST /gateway/usage` means for the report."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in NON_RETRYABLE_STATUSES:
        return Verdict.DEAD
    if status in RETRYABLE_STATUSES or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.DEAD


def backoff_s(*, tries_done: int, base_s: float, jitter: float) -> float:
    """The wait before the next try, after `tries_done` tries (>= 1) have failed.

    base * 2^(tries_done - 1), stretched by `jitter` ∈ [0, 1) up to twice that, so that
    reports that failed together do not come back together. With the defaults (base 1 s,
    8 tries) the seven waits add up to between 127 s and 254 s: a report is given up
    about four minutes after its first try at the latest.
    """
    return base_s * 2 ** (tries_done - 1) * (1.0 + jitter)


def retry_after_s(value: str | None, *, now: datetime) -> float | None:
    """A `Retry-After` header in seconds (delta-seconds or an HTTP date), capped; None
    when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def truncate(text: str) -> str:
    if len(text) <= LAST_ERROR_MAX_CHARS:
        return text
    return text[: LAST_ERROR_MAX_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """The outcome of one resolved attempt, as it will be reported to the platform."""

    correlation_id: str  # the platform's attempt_id
    platform_request_id: str
    position: int
    provider: str
    model: str
    status: str  # UsageReport.Outcome
    is_final_attempt: bool
    usage: TokenUsage | None = None
    error_class: str = ""

    def row(self) -> dict[str, Any]:
        """The per-attempt columns of its outbox row (the request's columns, its id and
        user, come from the usage row written with it)."""
        u = self.usage
        return {
            "correlation_id": self.correlation_id,
            "platform_request_id": self.platform_request_id,
            "position": self.position,
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "is_final_attempt": self.is_final_attempt,
            "prompt_tokens": u.prompt_tokens if u else 0,
            "completion_tokens": u.output_tokens if u else 0,
            "total_tokens": u.total_tokens if u else 0,
            "cache_read_tokens": u.cache_read_tokens if u else 0,
            "cache_write_tokens": u.cache_write_tokens if u else 0,
            "error_class": self.error_class,
        }
