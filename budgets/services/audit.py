"""The books' audit (docs/SPEC.md §3.5): every user's `reserved` and `spend` against the
ledger they are derived from (open holds, counted usage rows), and the repair."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from budgets import selectors
from budgets.models import Ceiling, GatewayUser
from budgets.services.holds import holds_expire_stale
from common.money import exact_str

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BookRepair:
    """What a repair changed on one account (a user or a ceiling)."""

    kind: str
    account_id: str
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
    with transaction.atomic(durable=True):
        selectors.user_lock(user_id)
        (book,) = selectors.books_for_users(user_id=user_id)
        repair = _repair(GatewayUser, book)
    return _logged(repair)


def ceiling_books_repair(*, ceiling_id: Any) -> BookRepair | None:
    """`user_books_repair` for a ceiling, under the ceiling's row lock (every statement
    that moves a ceiling's money changes its row with its holds and usage rows)."""
    with transaction.atomic(durable=True):
        selectors.ceiling_lock(ceiling_id)
        (book,) = selectors.books_for_ceilings(ceiling_id=ceiling_id)
        repair = _repair(Ceiling, book)
    return _logged(repair)


def _repair(model: type[GatewayUser | Ceiling], book: selectors.BookDrift) -> BookRepair | None:
    """Inside the account's lock: write the ledger's sums when they disagree."""
    if book.balanced:
        return None
    model.objects.filter(pk=book.account_id).update(
        reserved_usd=book.open_holds_usd, spend_usd=book.window_usage_usd
    )
    return BookRepair(
        kind=book.kind,
        account_id=book.account_id,
        reserved_before_usd=book.reserved_usd,
        reserved_after_usd=book.open_holds_usd,
        spend_before_usd=book.spend_usd,
        spend_after_usd=book.window_usage_usd,
    )


def _logged(repair: BookRepair | None) -> BookRepair | None:
    if repair is not None:
        logger.warning(
            "audit repair of %s %s: reserved %s -> %s, spend %s -> %s",
            repair.kind,
            repair.account_id,
            exact_str(repair.reserved_before_usd),
            exact_str(repair.reserved_after_usd),
            exact_str(repair.spend_before_usd),
            exact_str(repair.spend_after_usd),
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

    def count(self, kind: str) -> int:
        """How many accounts of `kind` ("user", "ceiling") are out of balance."""
        return sum(1 for drift in self.drifts if drift.kind == kind)

    @property
    def clean(self) -> bool:
        return not self.drifts and not self.stale_holds


def budgets_audit(*, fix: bool = False, now: datetime | None = None) -> AuditResult:
    """Check the §3.5 invariants; with `fix`, expire overdue holds and repair the books."""
    now = now or timezone.now()
    drifts = selectors.books_drift_list()
    overdue = now - timedelta(seconds=settings.OTARI_BEAT_INTERVAL_SECONDS)
    stale = selectors.holds_stale(now=overdue).count()
    repairs: list[BookRepair] = []
    expired = 0
    if fix:
        # The sweep first: it releases reservations in step with the holds, so the
        # repair that follows only corrects what the ledger itself disagrees with.
        if stale:
            expired = holds_expire_stale(now=now)
        for drift in drifts:
            if drift.kind == "ceiling":
                repair = ceiling_books_repair(ceiling_id=drift.account_id)
            else:
                repair = user_books_repair(user_id=drift.account_id)
            if repair is not None:
                repairs.append(repair)
    return AuditResult(
        drifts=drifts, stale_holds=stale, repairs=repairs, stale_holds_expired=expired
    )
