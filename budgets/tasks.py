"""Celery entry points of the budgets app: thin, each calls one service.

Names are explicit and stable (the beat schedule and queued messages refer to them).
Every task is idempotent, so a duplicate run (two beats, a redelivered message) is
harmless. Services are imported inside the functions: budgets.services imports this
module to enqueue alert deliveries.
"""

from __future__ import annotations

import logging

from celery import shared_task

from otari.celery import enqueue

logger = logging.getLogger(__name__)


@shared_task(name="budgets.roll_due_periods", ignore_result=True)
def budgets_roll_due_periods() -> int:
    """Roll every budget period that has ended (what `manage.py reset_budgets` does)."""
    from budgets.services.periods import budgets_roll_due

    summary = budgets_roll_due()
    rolled = len(summary.rolled) + len(summary.rolled_ceilings)
    if rolled:
        logger.info("rolled %d budget period(s)", rolled)
    return rolled


@shared_task(name="budgets.expire_stale_holds", ignore_result=True)
def holds_expire_stale() -> int:
    """Release holds past their expiry (what `manage.py release_stale_holds` does)."""
    from budgets.services.holds import holds_expire_stale as expire

    expired = expire()
    if expired:
        logger.warning("expired %d stale hold(s)", expired)
    return expired


@shared_task(name="budgets.sweep_alerts", ignore_result=True)
def budget_alerts_sweep() -> int:
    """Raise alerts for thresholds reached without one, and re-drive lost deliveries."""
    from budgets.services.alerts import budget_alerts_sweep as sweep

    return len(sweep().created)


@shared_task(name="budgets.deliver_alert", ignore_result=True)
def budget_alert_deliver(alert_id: int) -> str:
    """Deliver one budget alert; a transient failure schedules the next attempt.

    Retries are enqueued with a countdown rather than through Celery's own retry: with
    no broker (the embedded mode) Celery would re-run the task at once, with no delay,
    while `enqueue` honours the countdown in both modes. The attempt count and the cap
    live on the alert row.
    """
    from budgets.services.alerts import budget_alert_deliver as deliver

    outcome = deliver(alert_id=alert_id)
    if outcome.retry_in_s is not None:
        enqueue(budget_alert_deliver, alert_id, countdown=outcome.retry_in_s)
    return outcome.status
