"""Budgets and users (docs/SPEC.md §3, §6): creating and changing them. A user's money
(`spend`, `reserved`) is never edited here: holds.py moves it, periods.py rolls it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from budgets import alerting, periods, selectors
from budgets.exceptions import InvalidAlertSettings, InvalidRateLimit
from budgets.models import MAX_RPM_LIMIT, MAX_TPM_LIMIT, APIKey, Budget, Ceiling, GatewayUser
from budgets.services.periods import start_fresh_window
from common.exceptions import Conflict
from common.history import history_record

ZERO = Decimal("0")


class _Unset:
    """Marks an argument the caller did not pass (None is a meaningful value here)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def alert_settings_clean(
    *, thresholds_pct: Any = UNSET, webhook_url: Any = UNSET, emails: Any = UNSET
) -> dict[str, Any]:
    """The alert settings that were passed, validated (InvalidAlertSettings otherwise)."""
    cleaned: dict[str, Any] = {}
    try:
        if thresholds_pct is not UNSET:
            cleaned["alert_thresholds_pct"] = alerting.clean_thresholds(thresholds_pct)
        if webhook_url is not UNSET:
            cleaned["alert_webhook_url"] = alerting.clean_webhook_url(webhook_url)
        if emails is not UNSET:
            cleaned["alert_emails"] = alerting.clean_emails(emails)
    except ValidationError as exc:
        # The messages name the rule, never the rejected value.
        raise InvalidAlertSettings("; ".join(exc.messages)) from None
    return cleaned


def rate_limits_check(*, rpm_limit: Any = UNSET, tpm_limit: Any = UNSET) -> None:
    """Rate limits are null (unlimited) or whole numbers from 1 to their maximum: 0 would
    refuse every request (blocking a user says that), and a value past the column's range
    would be a database error. InvalidRateLimit (422) names the rule, not the value."""
    for name, value, maximum in (
        ("rpm_limit", rpm_limit, MAX_RPM_LIMIT),
        ("tpm_limit", tpm_limit, MAX_TPM_LIMIT),
    ):
        if value is UNSET or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidRateLimit(
                f"{name}: Must be a whole number from 1 to {maximum}, or null for no limit."
            )


def budget_create(
    *,
    name: str = "",
    max_budget_usd: Decimal | None = None,
    budget_duration_sec: int | None = None,
    reset_alignment: str | None = None,
    alert_thresholds_pct: list[int] = UNSET,
    alert_webhook_url: str = UNSET,
    alert_emails: list[str] = UNSET,
) -> Budget:
    alerts = alert_settings_clean(
        thresholds_pct=alert_thresholds_pct, webhook_url=alert_webhook_url, emails=alert_emails
    )
    return Budget.objects.create(
        name=name,
        max_budget_usd=max_budget_usd,
        budget_duration_sec=budget_duration_sec,
        reset_alignment=reset_alignment,
        **alerts,
    )


def budget_update(
    *,
    budget_id: str,
    name: str = UNSET,
    max_budget_usd: Decimal | None = UNSET,
    budget_duration_sec: int | None = UNSET,
    reset_alignment: str | None = UNSET,
    alert_thresholds_pct: list[int] = UNSET,
    alert_webhook_url: str = UNSET,
    alert_emails: list[str] = UNSET,
    now: datetime | None = None,
) -> Budget:
    """Change a budget. Takes effect on its users' next request in every process (nothing
    caches budgets). A changed period re-times each user's current window from its start
    (spend is kept; a window that has thereby ended rolls at the next request)."""
    now = now or timezone.now()
    alerts = alert_settings_clean(
        thresholds_pct=alert_thresholds_pct, webhook_url=alert_webhook_url, emails=alert_emails
    )
    with transaction.atomic(durable=True):
        # FOR NO KEY UPDATE, not FOR UPDATE: a settlement on the general path holds its
        # user's row and, at commit, re-checks the row's foreign key to this budget (a KEY
        # SHARE lock); FOR UPDATE would make it wait for this edit while the edit waits for
        # the user below, a deadlock (tests/budgets/test_budget_edit_lock_order.py).
        budget = Budget.objects.select_for_update(no_key=True).get(pk=budget_id)
        old_period = (budget.budget_duration_sec, budget.reset_alignment)
        for field_name, value in (
            ("name", name),
            ("max_budget_usd", max_budget_usd),
            ("budget_duration_sec", budget_duration_sec),
            ("reset_alignment", reset_alignment),
            *alerts.items(),
        ):
            if value is not UNSET:
                setattr(budget, field_name, value)
        budget.save()
        if (budget.budget_duration_sec, budget.reset_alignment) != old_period:
            # Lock the users in primary-key order, as every multi-row lock here does.
            for user in (
                GatewayUser.objects.select_for_update(no_key=True)
                .filter(budget=budget)
                .order_by("pk")
            ):
                start = user.budget_started_at or now
                if budget.has_period:
                    _, next_reset = periods.fresh_window(
                        start,
                        duration_sec=budget.budget_duration_sec,
                        alignment=budget.reset_alignment,
                    )
                else:
                    next_reset = None
                GatewayUser.objects.filter(pk=user.pk).update(
                    budget_started_at=start, next_budget_reset_at=next_reset
                )
        return budget


def budget_delete(*, budget_id: str) -> None:
    """Delete a budget that no live user and no ceiling is on (its reset history is
    kept); otherwise Conflict (409) naming what is in the way.

    Deleted users still pointing at it are detached first: they can never be billed
    again, and otherwise nothing could ever free the budget (a deleted user cannot be
    moved to another one).
    """
    with transaction.atomic(durable=True):
        budget = Budget.objects.select_for_update().get(pk=budget_id)
        if GatewayUser.objects.filter(budget=budget, deleted_at__isnull=True).exists():
            raise Conflict(
                "The budget still has users; move them to another budget first",
                code="budget_in_use",
            )
        ceilings = Ceiling.objects.filter(budget=budget)
        if ceilings.exists():
            # Imported here: tenancy imports this module (UNSET).
            from budgets.services.tenancy import ceilings_listed

            raise Conflict(
                f"The budget is used by scoped budget(s) {ceilings_listed(ceilings)}; point "
                "them at another budget or delete them first",
                code="budget_in_use",
            )
        GatewayUser.objects.filter(budget=budget).update(budget=None, next_budget_reset_at=None)
        budget.delete()


def user_create(
    *,
    user_id: str,
    alias: str = "",
    budget: Budget | None = None,
    blocked: bool = False,
    allowed_models: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    now: datetime | None = None,
) -> GatewayUser:
    """Create a user; a budget given here starts its first window now."""
    rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        # Created on its budget, so that its first version names it (otari/history.py).
        user = GatewayUser.objects.create(
            user_id=user_id,
            alias=alias,
            budget=budget,
            blocked=blocked,
            allowed_models=allowed_models,
            metadata=metadata or {},
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )
        if budget is not None:
            start_fresh_window(user, budget, now)
        return user


def user_ensure(*, user_id: str) -> GatewayUser:
    """The user a platform resolve named (docs/SPEC.md §7), created on first sight: no
    budget (the platform prices and bills), marked in its metadata as the platform's.
    Safe under concurrency: of two first requests, one creates and the other reads."""
    with transaction.atomic(durable=True):
        user, _ = GatewayUser.objects.get_or_create(
            pk=user_id, defaults={"metadata": {"created_by": "platform"}}
        )
        return user


def user_update(
    *,
    user_id: str,
    alias: str = UNSET,
    blocked: bool = UNSET,
    allowed_models: list[str] | None = UNSET,
    metadata: dict[str, Any] = UNSET,
    budget: Budget | None = UNSET,
    rpm_limit: int | None = UNSET,
    tpm_limit: int | None = UNSET,
    now: datetime | None = None,
) -> GatewayUser:
    """Change a user. Moving them to a different budget starts a fresh window (§3.6);
    their spend and reserved are otherwise never edited here."""
    rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        user = selectors.user_lock(user_id)
        changes = {
            name: value
            for name, value in (
                ("alias", alias),
                ("blocked", blocked),
                ("allowed_models", allowed_models),
                ("metadata", metadata),
                ("rpm_limit", rpm_limit),
                ("tpm_limit", tpm_limit),
            )
            if value is not UNSET
        }
        if changes:
            GatewayUser.objects.filter(pk=user.pk).update(**changes, updated_at=now)
        moved = budget is not UNSET and user.budget_id != (budget.budget_id if budget else None)
        if moved:
            start_fresh_window(user, budget, now)
        user.refresh_from_db()
        if changes or moved:
            history_record(user)
        return user


def user_budget_assign(
    *, user_id: str, budget: Budget | None, now: datetime | None = None
) -> GatewayUser:
    """Put a user on a budget (or none). A different budget starts a fresh window (§3.6)."""
    return user_update(user_id=user_id, budget=budget, now=now)


def user_delete(*, user_id: str, now: datetime | None = None) -> GatewayUser:
    """Soft-delete: the user can no longer be billed, their keys stop working, and their
    usage history stays."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        user = selectors.user_lock(user_id)
        GatewayUser.objects.filter(pk=user.pk).update(deleted_at=now, updated_at=now)
        live_keys = list(APIKey.objects.filter(user=user, is_active=True).order_by("pk"))
        APIKey.objects.filter(pk__in=[k.pk for k in live_keys]).update(
            is_active=False, updated_at=now
        )
        user.refresh_from_db()
        history_record(user)
        for key in live_keys:
            key.is_active = False
            history_record(key)
        return user


def user_topup_set(
    *,
    user_id: str,
    amount_usd: Decimal,
    expires_at: datetime | None,
) -> GatewayUser:
    """Raise a user's limit by `amount_usd` until `expires_at` (0 or None removes it).

    A top-up replaces any previous one; it is added to the budget's max at admission.
    """
    with transaction.atomic(durable=True):
        user = selectors.user_lock(user_id)
        if not amount_usd or expires_at is None:
            amount_usd, expires_at = ZERO, None
        GatewayUser.objects.filter(pk=user.pk).update(
            topup_usd=amount_usd, topup_expires_at=expires_at, updated_at=timezone.now()
        )
        user.refresh_from_db()
        history_record(user)
        return user
