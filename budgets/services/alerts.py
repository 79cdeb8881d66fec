"""Budget alerts (docs/OPERATIONS.md): recording the thresholds a user's spend reached,
once per window, and delivering them by webhook and email with retries."""

from __future__ import annotations

import logging
import random
import smtplib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from budgets import alerting, rules, selectors
from budgets.models import Budget, BudgetAlert, GatewayUser
from budgets.services.holds import BudgetState
from budgets.tasks import budget_alert_deliver as budget_alert_deliver_task
from common.money import exact_str
from otari.celery import enqueue, enqueue_detached_on_commit

logger = logging.getLogger(__name__)

ALERT_MAX_ATTEMPTS = 6
_ALERT_BACKOFF_CAP_S = 60.0


def _alert_lease() -> timedelta:
    """An attempt older than this is presumed dead (its worker was killed) and its alert
    may be attempted again; the sweep re-drives it at once (OTARI_ALERT_LEASE_SECONDS)."""
    return timedelta(seconds=settings.OTARI_ALERT_LEASE_SECONDS)


def _alert_redrive_after() -> timedelta:
    """A pending alert untouched this long lost its delivery (the broker lost the message,
    a retry's countdown message with it): the sweep enqueues it again
    (OTARI_ALERT_REDRIVE_AFTER_SECONDS)."""
    return timedelta(seconds=settings.OTARI_ALERT_REDRIVE_AFTER_SECONDS)


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
        limit = BudgetState.of(user, now).limit_usd
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
            # The alert row is the outbox: its delivery is published without waiting for
            # the broker, and kept until the broker is back when it is down.
            enqueue_detached_on_commit(budget_alert_deliver_task, alert.pk)
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
    budgets = Budget.objects.filter(rules.alerts_enabled_q(), max_budget_usd__gt=0).order_by("pk")
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
    overdue = now - _alert_redrive_after()
    # A finished attempt clears its lease, so a lease that ran out is an attempt whose
    # worker died (kill -9, OOM): its alert is due again now, not after the re-drive delay.
    stalled = (
        BudgetAlert.objects.filter(status=BudgetAlert.Status.PENDING)
        .filter(
            Q(leased_until__lt=now)
            | Q(leased_until__isnull=True, last_attempt_at__isnull=True, created_at__lte=overdue)
            | Q(leased_until__isnull=True, last_attempt_at__lte=overdue)
        )
        .values_list("pk", flat=True)
    )
    redriven = 0
    for alert_id in stalled:
        enqueue(budget_alert_deliver_task, alert_id)
        redriven += 1
    return AlertSweep(created=created, redriven=redriven)


class _TransientDeliveryError(Exception):
    """A delivery failure worth retrying (timeout, connection error, 408/425/429/5xx)."""


def budget_alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    """The webhook's JSON body (amounts as exact decimal strings)."""
    return {
        "type": "budget.threshold_reached",
        "alert_id": alert.pk,
        "user": alert.user_id,
        "budget": alert.budget_id,
        "threshold": alert.threshold_pct,
        "spend": exact_str(alert.spend_usd),
        "limit": exact_str(alert.limit_usd),
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
        f"User {alert.user_id} has spent ${exact_str(alert.spend_usd)} of their "
        f"${exact_str(alert.limit_usd)} limit (budget {alert.budget_id}), reaching the "
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
                attempts=F("attempts") + 1, last_attempt_at=now, leased_until=now + _alert_lease()
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
