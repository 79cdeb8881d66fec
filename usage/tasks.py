"""Celery entry points of the usage app: thin, each calls one service (usage.services).

Names are explicit and stable: queued messages and the beat schedule refer to them.
Both tasks are idempotent (a report is claimed by compare-and-swap before it is sent, and
the platform deduplicates by correlation id), so a duplicate message is harmless.
"""

from __future__ import annotations

import logging

from celery import shared_task

from otari.celery import enqueue

logger = logging.getLogger(__name__)


# acks_late: a worker killed mid-push leaves the message unacknowledged, so the broker
# hands it out again (after its visibility timeout); the re-drive below is the sooner
# safety net, as the row's lease runs out long before that.
@shared_task(name="usage.push_report", ignore_result=True, acks_late=True)
def usage_report_push(correlation_id: str) -> str:
    """One delivery try of a platform usage report; a transient failure schedules the
    next try. Retries are enqueued with a countdown rather than through Celery's own
    retry, as budgets.deliver_alert does: without a broker Celery would retry at once,
    while `enqueue` honours the delay in both modes. Tries and their cap live on the row."""
    from usage.services import usage_report_deliver

    outcome = usage_report_deliver(correlation_id=correlation_id)
    if outcome.retry_in_s is not None:
        enqueue(usage_report_push, correlation_id, countdown=outcome.retry_in_s)
    return outcome.status


@shared_task(name="usage.redrive_reports", ignore_result=True)
def usage_reports_redrive() -> int:
    """Enqueue again the pending reports whose delivery task was lost."""
    from usage.services import usage_reports_redrive_stalled

    redriven = usage_reports_redrive_stalled()
    if redriven:
        logger.warning("re-drove %d stalled platform usage report(s)", redriven)
    return redriven
