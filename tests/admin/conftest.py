"""Console test helpers: money written through the real services, admin URLs, and staff
users with exactly the permissions a test names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission
from django.db import models
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from budgets.models import GatewayUser, Hold
from budgets.services import holds
from usage import ledger
from usage.models import UsageLog
from usage.pricing import TokenUsage

# Debian's chromium: the only browser the tests drive (Playwright never downloads one).
CHROMIUM = Path(os.environ.get("OTARI_CHROMIUM", "/usr/bin/chromium"))


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return (
            f"headless browser tests need Debian's chromium at {CHROMIUM} "
            "(run scripts/install-browser-deps)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "headless browser tests need Playwright (pip install -e '.[dev]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests skip, with the reason, where Chromium or Playwright is missing; CI
    sets OTARI_REQUIRE_BROWSER=1, which turns that into a failed run instead."""
    browser_items = [item for item in items if "browser" in item.keywords]
    reason = browser_missing() if browser_items else None
    if reason is None:
        return
    if os.environ.get("OTARI_REQUIRE_BROWSER") == "1":
        raise pytest.UsageError(f"OTARI_REQUIRE_BROWSER=1 but {reason}")
    for item in browser_items:
        item.add_marker(pytest.mark.skip(reason=reason))


def admin_url(model: type[models.Model] | models.Model, action: str, *args: object) -> str:
    opts = model._meta
    if isinstance(model, models.Model) and action in ("change", "delete", "history"):
        args = (model.pk,)
    return reverse(
        f"admin:{opts.app_label}_{opts.model_name}_{action}", args=[quote(a) for a in args]
    )


def charge(
    user: GatewayUser,
    cost: str | Decimal,
    *,
    at: datetime | None = None,
    provider: str = "openai",
    model: str = "gpt-4o-mini",
    hold: str | Decimal = "0.000001",
    error_message: str = "",
    workspace_id: uuid.UUID | None = None,
) -> UsageLog:
    """One settled request of `cost` for `user`, as the gateway records it (a tiny hold,
    so a test can push spend past the limit the way a bigger-than-estimated reply does),
    in `workspace_id` when given."""
    now = at or timezone.now()
    request_id = uuid.uuid4()
    holds.hold_open(
        user_id=user.pk,
        request_id=request_id,
        amount_usd=Decimal(hold),
        model_key=f"{provider}:{model}",
        now=now,
    )
    holds.hold_settle(
        record=ledger.UsageRecord(
            request_id=request_id,
            user_id=user.pk,
            api_key_id=None,
            endpoint="/v1/chat/completions",
            provider=provider,
            model=model,
            status="success",
            status_code=200,
            usage=TokenUsage(input_tokens=100, output_tokens=20),
            cost_usd=Decimal(cost),
            latency_ms=120,
            error_message=error_message,
            workspace_id=workspace_id,
        ),
        now=now,
    )
    return UsageLog.objects.get(pk=request_id)


def fail(
    user: GatewayUser,
    *,
    at: datetime | None = None,
    status_code: int = 502,
    message: str = "LLM provider error",
    model: str = "gpt-4o-mini",
    upstream_status_code: int | None = None,
    upstream_error: str = "",
) -> UsageLog:
    """A refused or failed request: a usage row with no cost."""
    request_id = uuid.uuid4()
    holds.usage_record(
        record=ledger.UsageRecord(
            request_id=request_id,
            user_id=user.pk,
            api_key_id=None,
            endpoint="/v1/chat/completions",
            provider="openai",
            model=model,
            status="error",
            status_code=status_code,
            error_message=message,
            upstream_status_code=upstream_status_code,
            upstream_error=upstream_error,
            latency_ms=40,
        ),
        now=at or timezone.now(),
    )
    return UsageLog.objects.get(pk=request_id)


def open_hold(user: GatewayUser, amount: str | Decimal, *, at: datetime | None = None) -> Hold:
    request_id = uuid.uuid4()
    holds.hold_open(
        user_id=user.pk,
        request_id=request_id,
        amount_usd=Decimal(amount),
        model_key="openai:gpt-4o-mini",
        now=at or timezone.now(),
    )
    return Hold.objects.get(pk=request_id)


@pytest.fixture
def staff_client(db, django_user_model) -> Callable[..., Client]:
    """A logged-in client for a staff (not super) user holding exactly `perms`
    ("app_label.codename")."""

    def make(*perms: str) -> Client:
        user = django_user_model.objects.create_user(
            username=f"staff-{uuid.uuid4().hex[:8]}", password="not-used-1", is_staff=True
        )
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client = Client()
        client.force_login(user)
        return client

    return make
