"""Writes of the usage app: price versions, and the delivery of platform usage reports."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from common.config import PriceConfig, gateway_config
from otari.celery import enqueue, enqueue_on_commit
from usage import catalog, reporting
from usage.catalog import CatalogPrice
from usage.models import ModelPricing, UsageReport
from usage.reporting import Verdict
from usage.selectors import price_at, prices_current
from usage.tasks import usage_report_push as usage_report_push_task

logger = logging.getLogger(__name__)


def pricing_set(
    *,
    model_key: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cache_read_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    effective_at: datetime | None = None,
    origin: str = ModelPricing.Origin.API,
) -> ModelPricing:
    """Add a price version for `model_key`, in effect from `effective_at` (default now).

    A version at exactly the same instant is replaced, so setting a price twice is safe.
    """
    effective_at = effective_at or timezone.now()
    with transaction.atomic(durable=True):
        price, _ = ModelPricing.objects.update_or_create(
            model_key=model_key,
            effective_at=effective_at,
            defaults={
                "input_price_per_mtok_usd": input_per_mtok,
                "output_price_per_mtok_usd": output_per_mtok,
                "cache_read_price_per_mtok_usd": cache_read_per_mtok,
                "cache_write_price_per_mtok_usd": cache_write_per_mtok,
                "origin": origin,
            },
        )
        return price


def pricing_delete(*, model_key: str, effective_at: datetime | None = None) -> int:
    """Delete one price version (`effective_at`) or every version of a model; returns
    how many rows went. Usage rows keep their cost: it was computed when they settled."""
    with transaction.atomic(durable=True):
        versions = ModelPricing.objects.filter(model_key=model_key)
        if effective_at is not None:
            versions = versions.filter(effective_at=effective_at)
        deleted, _ = versions.delete()
        return deleted


def _differs(price: ModelPricing | None, config: PriceConfig) -> bool:
    if price is None:
        return True
    return (
        price.input_price_per_mtok_usd != config.input_per_mtok
        or price.output_price_per_mtok_usd != config.output_per_mtok
        or price.cache_read_price_per_mtok_usd != config.cache_read_per_mtok
        or price.cache_write_price_per_mtok_usd != config.cache_write_per_mtok
    )


def pricing_sync_from_config(*, now: datetime | None = None) -> list[ModelPricing]:
    """Make the YAML file's `pricing:` the current price of each model it names.

    Adds a version only where the current price differs, so restarts add nothing and
    history stays readable; prices set through the API or admin since are overridden only
    when the file itself changes them.
    """
    now = now or timezone.now()
    added = []
    for model_key, config in gateway_config().pricing.items():
        if _differs(price_at(model_key, now), config):
            added.append(
                pricing_set(
                    model_key=model_key,
                    input_per_mtok=config.input_per_mtok,
                    output_per_mtok=config.output_per_mtok,
                    cache_read_per_mtok=config.cache_read_per_mtok,
                    cache_write_per_mtok=config.cache_write_per_mtok,
                    effective_at=now,
                    origin=ModelPricing.Origin.CONFIG,
                )
            )
    return added


# ---------------------------------------------------------------------------------------
# Catalog prices (usage.catalog): frozen on first use, changed only by `prices sync`.


def _catalog_row_values(price: CatalogPrice) -> dict[str, object]:
    return {
        "input_price_per_mtok_usd": price.rates.input_per_mtok,
        "output_price_per_mtok_usd": price.rates.output_per_mtok,
        "cache_read_price_per_mtok_usd": price.rates.cache_read_per_mtok,
        "cache_write_price_per_mtok_usd": price.rates.cache_write_per_mtok,
        "origin": ModelPricing.Origin.CATALOG,
        "catalog_version": price.version,
    }


def pricing_freeze_catalog(*, model_key: str, price: CatalogPrice, now: datetime) -> ModelPricing:
    """Make a catalog price the model's price row, the first time the model is used.

    Returns the row that prices the model now: the new one, or the one another process
    froze (or an operator set) meanwhile, which is kept as it is. Two processes meeting a
    new model at once queue on an advisory lock on its key, so the second finds the
    first's row instead of adding a second version. (SQLite serialises writers anyway.)
    """
    with transaction.atomic(durable=True):
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"otari.price:{model_key}"]
                )
        existing = price_at(model_key, now) or (
            # Frozen by a host whose clock runs ahead of ours.
            ModelPricing.objects.filter(model_key=model_key, origin=ModelPricing.Origin.CATALOG)
            .order_by("-effective_at")
            .first()
        )
        if existing is not None:
            return existing
        return ModelPricing.objects.create(
            model_key=model_key, effective_at=now, **_catalog_row_values(price)
        )


@dataclass(frozen=True)
class CatalogPriceChange:
    """A model priced from the catalog whose installed catalog price differs."""

    model_key: str
    current: ModelPricing
    # The installed catalog's price; None when the catalog no longer prices the model
    # (its frozen price is then kept).
    new: CatalogPrice | None

    @property
    def changes(self) -> bool:
        if self.new is None:
            return False
        rates, row = self.new.rates, self.current
        return (
            rates.input_per_mtok != row.input_price_per_mtok_usd
            or rates.output_per_mtok != row.output_price_per_mtok_usd
            or rates.cache_read_per_mtok != row.cache_read_price_per_mtok_usd
            or rates.cache_write_per_mtok != row.cache_write_price_per_mtok_usd
        )


def pricing_catalog_sync(
    *,
    catalog_provider_of: Callable[[str], str | None],
    apply: bool,
    now: datetime | None = None,
) -> list[CatalogPriceChange]:
    """Compare every model whose current price is a catalog price with the installed
    catalog; with `apply`, add a new catalog version (in effect from `now`) for each whose
    rates changed. Operator prices are never touched, and past usage rows keep the cost
    they were charged.

    `catalog_provider_of(provider_name)`: the catalog provider of a configured provider
    instance (None when it has none, or is no longer configured).
    """
    now = now or timezone.now()
    found = []
    for row in prices_current(now):
        if row.origin != ModelPricing.Origin.CATALOG:
            continue
        provider_name, _, model = row.model_key.partition(":")
        provider_id = catalog_provider_of(provider_name)
        new = catalog.catalog_price(provider_id, model) if provider_id else None
        change = CatalogPriceChange(model_key=row.model_key, current=row, new=new)
        if change.changes or new is None:
            found.append(change)
    if apply:
        with transaction.atomic(durable=True):
            for change in found:
                if change.new is not None:
                    ModelPricing.objects.update_or_create(
                        model_key=change.model_key,
                        effective_at=now,
                        defaults=_catalog_row_values(change.new),
                    )
    return found


# ---------------------------------------------------------------------------------------
# Platform usage reports (docs/SPEC.md §7, docs/PLATFORM.md). The policy is usage.reporting's;
# here are the row's state moves, each a compare-and-swap, and the POST itself.

# A try that has not recorded its outcome after twice its POST's timeout and this margin
# is presumed dead (its worker was killed), and the report may be tried again.
_LEASE_MARGIN = timedelta(seconds=5)
# Rows handled per re-drive run; the next run takes the rest.
_REDRIVE_BATCH = 1000

_http: httpx.Client | None = None
_http_lock = threading.Lock()


def _platform_http() -> httpx.Client:
    """One pooled client per worker process (thread-safe; created after any fork)."""
    global _http
    if _http is None:
        with _http_lock:
            if _http is None:
                _http = httpx.Client(follow_redirects=False)
    return _http


@dataclass(frozen=True)
class ReportDelivery:
    """What one call of `usage_report_deliver` did."""

    status: str  # the row's delivery status after it, or "missing" / "unconfigured"
    # Seconds until the next try is due, when the caller should schedule one.
    retry_in_s: float | None = None


def _report_lease() -> timedelta:
    # Twice: httpx's timeout bounds each phase of the POST (connect, write, read), not
    # the whole of it.
    return 2 * timedelta(seconds=settings.OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS) + _LEASE_MARGIN


def _report_send(report: UsageReport) -> tuple[int | None, str, str | None]:
    """POST the report: (status code or None for a transport failure, what to keep of
    the answer, its Retry-After)."""
    try:
        response = _platform_http().post(
            f"{settings.OTARI_PLATFORM_URL}/gateway/usage",
            json=report.payload(),
            headers={
                "X-Gateway-Token": settings.OTARI_PLATFORM_TOKEN,
                "User-Agent": "otari-gateway",
            },
            timeout=settings.OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as exc:
        # The exception's name only: its text can carry the platform's URL.
        return None, type(exc).__name__, None
    return response.status_code, response.text, response.headers.get("retry-after")


def usage_report_deliver(*, correlation_id: str, now: datetime | None = None) -> ReportDelivery:
    """One delivery try of a report (the task `usage.push_report`).

    The try is claimed first, by compare-and-swap on the row's lease: of two workers
    handed the same report (a re-drive racing a retry, a redelivered message), one sends
    and the other returns. No transaction is open while the network is used. The outcome
    is recorded only while the claim is still ours, so a try whose lease ran out (a hung
    platform) cannot overwrite a later try's result.
    """
    if not (settings.OTARI_PLATFORM_URL and settings.OTARI_PLATFORM_TOKEN):
        # Platform mode was switched off with reports pending: they wait, untouched,
        # until it is switched on again (the re-drive does nothing meanwhile).
        logger.warning("platform usage report %s not sent: platform mode is off", correlation_id)
        return ReportDelivery(status="unconfigured")
    now = now or timezone.now()
    lease = now + _report_lease()
    claimed = (
        UsageReport.objects.filter(
            correlation_id=correlation_id,
            delivery_status=UsageReport.Delivery.PENDING,
            next_attempt_at__lte=now,
        )
        .filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
        .update(attempts=F("attempts") + 1, last_attempt_at=now, leased_until=lease)
    )
    report = UsageReport.objects.filter(correlation_id=correlation_id).first()
    if report is None:
        return ReportDelivery(status="missing")
    if not claimed:
        if (
            report.delivery_status == UsageReport.Delivery.PENDING
            and report.next_attempt_at > now
            and (report.leased_until is None or report.leased_until < now)
        ):
            # Early (a host whose clock runs behind, a duplicate of a retry): come back
            # when the try is due rather than leave it to the slower re-drive.
            return ReportDelivery(
                status=report.delivery_status,
                retry_in_s=(report.next_attempt_at - now).total_seconds(),
            )
        return ReportDelivery(status=report.delivery_status)

    status_code, answer, retry_after = _report_send(report)
    done = timezone.now()
    verdict = Verdict.RETRY if status_code is None else reporting.verdict_for_status(status_code)
    if verdict is Verdict.RETRY and report.attempts >= settings.OTARI_PLATFORM_REPORT_MAX_TRIES:
        verdict = Verdict.DEAD
    fields: dict[str, object] = {"leased_until": None, "last_status_code": status_code}
    retry_in_s: float | None = None
    if verdict is Verdict.DELIVERED:
        fields.update(delivery_status=UsageReport.Delivery.DELIVERED, delivered_at=done)
        fields["last_error"] = ""
    elif verdict is Verdict.DEAD:
        fields.update(delivery_status=UsageReport.Delivery.DEAD, dead_at=done)
        fields["last_error"] = reporting.truncate(answer)
    else:
        retry_in_s = reporting.retry_after_s(retry_after, now=done)
        if retry_in_s is None:
            retry_in_s = reporting.backoff_s(
                tries_done=report.attempts,
                base_s=settings.OTARI_PLATFORM_REPORT_BACKOFF_SECONDS,
                jitter=random.random(),  # noqa: S311 - spreading retries, not a secret
            )
        fields.update(next_attempt_at=done + timedelta(seconds=retry_in_s))
        fields["last_error"] = reporting.truncate(answer)
    recorded = UsageReport.objects.filter(
        pk=report.pk, delivery_status=UsageReport.Delivery.PENDING, leased_until=lease
    ).update(**fields)
    if not recorded:
        # Our lease ran out and another try took over: its outcome stands.
        return ReportDelivery(status="superseded")
    if verdict is Verdict.DEAD:
        logger.warning(
            "platform usage report %s dead-lettered after %d tr%s (last status %s)",
            correlation_id,
            report.attempts,
            "y" if report.attempts == 1 else "ies",
            status_code if status_code is not None else answer,
        )
        return ReportDelivery(status=UsageReport.Delivery.DEAD)
    if verdict is Verdict.DELIVERED:
        return ReportDelivery(status=UsageReport.Delivery.DELIVERED)
    return ReportDelivery(status=UsageReport.Delivery.PENDING, retry_in_s=retry_in_s)


def usage_reports_redrive_stalled(*, now: datetime | None = None) -> int:
    """The periodic safety net (beat task `usage.redrive_reports`): enqueue again every
    pending report whose try was due more than OTARI_PLATFORM_REPORT_REDRIVE_AFTER_SECONDS
    ago and is not in progress. Its task was lost: published to a broker that was down or
    lost its queue, or taken by a worker that died.

    Each row handed out has its due time moved to now (by compare-and-swap), so that it is
    handed out again only if this task is lost too, never once per run while it waits in
    a long queue.
    """
    if not (settings.OTARI_PLATFORM_URL and settings.OTARI_PLATFORM_TOKEN):
        return 0
    now = now or timezone.now()
    overdue = now - timedelta(seconds=settings.OTARI_PLATFORM_REPORT_REDRIVE_AFTER_SECONDS)
    stalled = UsageReport.objects.filter(
        delivery_status=UsageReport.Delivery.PENDING, next_attempt_at__lte=overdue
    ).filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
    redriven = 0
    for pk, correlation_id, due in stalled.order_by("next_attempt_at").values_list(
        "pk", "correlation_id", "next_attempt_at"
    )[:_REDRIVE_BATCH]:
        moved = UsageReport.objects.filter(
            pk=pk, delivery_status=UsageReport.Delivery.PENDING, next_attempt_at=due
        ).update(next_attempt_at=now)
        if moved:
            enqueue(usage_report_push_task, correlation_id)
            redriven += 1
    return redriven


def usage_reports_redrive_dead(
    *,
    status_code: int | None = None,
    report_ids: list[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Give dead-lettered reports a fresh round of tries (the command
    `redrive_usage_reports` and the admin action): all of them, those whose last answer
    had `status_code`, or the rows `report_ids`. Their last status and error stay on the
    row until the next try replaces them. Returns how many were re-driven."""
    from usage.selectors import usage_reports_dead

    now = now or timezone.now()
    dead = usage_reports_dead(status_code=status_code)
    if report_ids is not None:
        dead = dead.filter(pk__in=report_ids)
    with transaction.atomic(durable=True):
        # Locked, and skipping rows another re-drive holds: a row is revived once.
        revived = list(
            dead.select_for_update(skip_locked=True)
            .order_by("pk")
            .values_list("correlation_id", flat=True)
        )
        UsageReport.objects.filter(correlation_id__in=revived).update(
            delivery_status=UsageReport.Delivery.PENDING,
            attempts=0,
            next_attempt_at=now,
            leased_until=None,
            dead_at=None,
        )
        for correlation_id in revived:
            enqueue_on_commit(usage_report_push_task, correlation_id)
    return len(revived)
