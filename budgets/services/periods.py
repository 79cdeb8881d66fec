"""Budget periods (docs/SPEC.md §3.6): rolling a window that has ended, starting a fresh
one, and the sweep that rolls every due user and ceiling.

A user and a ceiling keep their window the same way (`spend_usd`, `budget_started_at`,
`next_budget_reset_at`, on the budget they name), so each function here takes either: an
"account". A roll sets `spend` to 0 and moves the window; it never touches `reserved`:
open holds settle into the new period. Every roll is a compare-and-swap on the window's
end under the account's row lock, so any number of processes may roll at once. The window
arithmetic itself is pure (budgets/periods.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from budgets import periods, selectors
from budgets.exceptions import UnknownUser
from budgets.models import Budget, BudgetResetLog, Ceiling, CeilingResetLog, GatewayUser

ZERO = Decimal("0")
# The smallest step of a timestamp (PostgreSQL keeps microseconds).
_INSTANT = timedelta(microseconds=1)

# A user or a ceiling: whatever keeps a window on a budget.
Account = GatewayUser | Ceiling
ResetLog = BudgetResetLog | CeilingResetLog


def _reset_log_create(
    user: Account, budget: Budget | None, start: datetime, next_reset: datetime | None
) -> ResetLog:
    """Keep the spend of the window that ends: nothing disappears from the books."""
    fields = {
        "budget": budget,
        "previous_spend_usd": user.spend_usd,
        "reset_at": start,
        "next_reset_at": next_reset,
    }
    if isinstance(user, Ceiling):
        return CeilingResetLog.objects.create(ceiling=user, **fields)
    return BudgetResetLog.objects.create(user=user, **fields)


def period_roll_locked(user: Account, now: datetime) -> ResetLog | None:
    """Start the account's current window if the previous one has ended.

    Must be called while holding the account's row lock (budgets.selectors.user_lock,
    ceilings_lock). Sets spend to 0 and moves the window; never touches `reserved`: open
    holds settle into the new period.
    """
    due = user.next_budget_reset_at
    if due is None or due > now:
        return None
    budget = user.budget
    if budget is None or not budget.has_period:
        # The period was removed since this window began: nothing resets any more.
        type(user).objects.filter(pk=user.pk).update(next_budget_reset_at=None)
        user.next_budget_reset_at = None
        return None
    start, next_reset = periods.window_after(
        due, now, duration_sec=budget.budget_duration_sec, alignment=budget.reset_alignment
    )
    # Compare-and-swap on the window end: of two processes rolling the same period, one
    # changes the row; the other changes nothing and writes no log.
    rolled = (
        type(user)
        .objects.filter(pk=user.pk, next_budget_reset_at=due)
        .update(spend_usd=ZERO, budget_started_at=start, next_budget_reset_at=next_reset)
    )
    if not rolled:
        return None
    log = _reset_log_create(user, budget, start, next_reset)
    user.spend_usd, user.budget_started_at, user.next_budget_reset_at = ZERO, start, next_reset
    return log


def user_period_roll(*, user_id: str, now: datetime | None = None) -> BudgetResetLog | None:
    """Roll the user's period if it is due; safe to call from any number of processes."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        try:
            user = selectors.user_lock(user_id)
        except UnknownUser:
            return None
        return period_roll_locked(user, now)


def user_period_reset(*, user_id: str, now: datetime | None = None) -> BudgetResetLog:
    """Start a fresh window now, whether or not the current one has ended (an operator's
    "reset budget period now").

    Spend goes to 0 and is kept in the reset-log row; `reserved` is never touched, so
    open holds settle into the new window. The next reset follows the budget's period
    from now (a calendar budget still resets on its next boundary). Raises UnknownUser.
    """
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        user = selectors.user_lock(user_id)
        log = _period_reset_locked(user, BudgetResetLog.objects.filter(user=user), now)
    assert isinstance(log, BudgetResetLog)  # noqa: S101 (always_log)
    return log


def ceiling_period_reset(*, ceiling_id: Any, now: datetime | None = None) -> CeilingResetLog:
    """`user_period_reset` for a ceiling (an operator's "reset period now")."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        ceiling = selectors.ceiling_lock(ceiling_id)
        log = _period_reset_locked(ceiling, CeilingResetLog.objects.filter(ceiling=ceiling), now)
    assert isinstance(log, CeilingResetLog)  # noqa: S101 (always_log)
    return log


def _period_reset_locked(account: Account, logs: Any, now: datetime) -> ResetLog:
    # Under the row lock: a second reset at the same instant (a double-submitted form),
    # or one whose window a reset or roll since `now` already began, finds that log
    # instead of starting another window.
    existing = logs.filter(reset_at__gte=now).first()
    if existing is not None:
        return existing
    # `now` was read before the lock: a request that settled meanwhile is stamped after
    # it, and its cost is in the spend this reset moves to the log. The new window starts
    # after that charge, or the charge would count in both windows (spend 0, window usage
    # > 0: found by the deadlock drill).
    last_charge = selectors.window_last_charge_at(account)
    if last_charge is not None and last_charge >= now:
        now = last_charge + _INSTANT
    log = start_fresh_window(account, account.budget, now, always_log=True)
    assert log is not None  # noqa: S101 (always_log)
    return log


def start_fresh_window(
    user: Account, budget: Budget | None, now: datetime, *, always_log: bool = False
) -> ResetLog | None:
    """Start a fresh window on `budget` now: spend 0, the next reset per its period.

    Must be called while holding the account's row lock (a ceiling being created needs
    none). The spend of the window that ends
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
        log = _reset_log_create(user, budget, start, next_reset)
    type(user).objects.filter(pk=user.pk).update(
        budget=budget,
        spend_usd=ZERO,
        budget_started_at=start,
        next_budget_reset_at=next_reset,
        updated_at=now,
    )
    user.budget, user.spend_usd = budget, ZERO
    user.budget_started_at, user.next_budget_reset_at = start, next_reset
    return log


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
    # Ceilings, swept the same way (not when the sweep was asked for one user).
    due_ceiling_ids: list[str] = field(default_factory=list)
    rolled_ceilings: list[CeilingResetLog] = field(default_factory=list)

    @property
    def previous_spend_usd(self) -> Decimal:
        return sum((log.previous_spend_usd for log in self.rolled), ZERO)


def _roll_if_due(
    model: type[Account], *, pk: Any, now: datetime, wait: bool
) -> tuple[str, ResetLog | None]:
    """Roll one account's period if it is due: ("rolled", log), or ("cleared" | "busy" |
    "current", None)."""
    with transaction.atomic(durable=True):
        # skip_locked (unless waiting was asked for): two sweeps on two hosts leapfrog each
        # other instead of queueing on the same rows, and an account in the middle of a
        # request is left to that request, which rolls the period itself before admitting.
        user = (
            model.objects.select_for_update(no_key=True, of=("self",), skip_locked=not wait)
            .select_related("budget")
            .filter(pk=pk)
            .first()
        )
        if user is None:
            return "busy", None
        was_due = user.next_budget_reset_at is not None and user.next_budget_reset_at <= now
        log = period_roll_locked(user, now)
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
    now = now or timezone.now()
    due_ids: list[str] = []
    rolled: list[BudgetResetLog] = []
    counts = {"cleared": 0, "busy": 0, "current": 0}
    after = ""
    while True:
        # Keyset pages: rolled users leave the due set, skipped ones stay in it.
        batch = list(
            selectors.users_due_for_reset(now=now, user_id=user_id, budget_id=budget_id)
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
            outcome, log = _roll_if_due(GatewayUser, pk=uid, now=now, wait=user_id is not None)
            if log is not None:
                rolled.append(log)
            else:
                counts[outcome] += 1
    due_ceilings: list[str] = []
    rolled_ceilings: list[CeilingResetLog] = []
    if user_id is None:
        due = Ceiling.objects.filter(next_budget_reset_at__lte=now).order_by("pk")
        if budget_id is not None:
            due = due.filter(budget_id=budget_id)
        for pk in due.values_list("pk", flat=True).iterator():
            due_ceilings.append(str(pk))
            if dry_run:
                continue
            outcome, log = _roll_if_due(Ceiling, pk=pk, now=now, wait=False)
            if isinstance(log, CeilingResetLog):
                rolled_ceilings.append(log)
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
        due_ceiling_ids=due_ceilings,
        rolled_ceilings=rolled_ceilings,
    )
