"""The usage-report outbox (docs/SPEC.md §7): rows written by the very statement (or
transaction) that writes the request's usage row, on both the fast and the general path;
and the delivery policy's arithmetic with the production defaults."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone

from budgets.models import GatewayUser, Hold
from budgets.services import holds
from tests.budgets.test_holds import open_hold, path  # noqa: F401 - the path fixture
from tests.conftest import run_async
from tests.factories import make_budget, make_user
from usage import ledger, reporting
from usage.models import UsageLog, UsageReport
from usage.pricing import TokenUsage
from usage.reporting import AttemptReport, Verdict

USAGE = TokenUsage(input_tokens=7, output_tokens=3, cache_read_tokens=2)


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    """The correlation ids handed to the delivery task (instead of a broker)."""
    sent: list[str] = []
    monkeypatch.setattr(
        ledger, "enqueue_detached", lambda task, correlation_id: sent.append(correlation_id)
    )
    return sent


def reported_record(user, request_id, *, status="success", cost="0.25") -> ledger.UsageRecord:
    reports = (
        AttemptReport(
            correlation_id=f"{request_id}-a",
            platform_request_id="preq",
            position=0,
            provider="openai",
            model="fail-500",
            status="error",
            is_final_attempt=False,
            error_class="provider_error",
        ),
        AttemptReport(
            correlation_id=f"{request_id}-b",
            platform_request_id="preq",
            position=1,
            provider="anthropic",
            model="claude",
            status=status,
            is_final_attempt=True,
            usage=USAGE if status == "success" else None,
            error_class="" if status == "success" else "provider_timeout",
        ),
    )
    return ledger.UsageRecord(
        request_id=request_id,
        user_id=user.user_id,
        api_key_id=None,
        endpoint="/v1/chat/completions",
        provider="anthropic",
        model="claude",
        status=status,
        status_code=200 if status == "success" else 504,
        usage=USAGE if status == "success" else None,
        cost_usd=Decimal(cost) if status == "success" else None,
        reports=reports,
    )


def assert_reported(request_id, enqueued: list[str]) -> None:
    rows = list(UsageReport.objects.filter(request_id=request_id).order_by("position"))
    assert [(r.correlation_id, r.status, r.is_final_attempt) for r in rows] == [
        (f"{request_id}-a", "error", False),
        (f"{request_id}-b", rows[1].status, True),
    ]
    assert all(r.delivery_status == "pending" and r.attempts == 0 for r in rows)
    assert sorted(enqueued) == [f"{request_id}-a", f"{request_id}-b"]


@pytest.mark.django_db(transaction=True)
def test_settle_writes_the_reports_with_the_usage_row_once(path, enqueued):  # noqa: F811
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    request_id = open_hold(user, "0.5")
    record = reported_record(user, request_id)
    run_async(holds.hold_settle_async(record=record, now=timezone.now()))

    assert UsageLog.objects.get().cost_usd == Decimal("0.25")
    assert_reported(request_id, enqueued)
    served = UsageReport.objects.get(correlation_id=f"{request_id}-b")
    assert (served.prompt_tokens, served.completion_tokens, served.total_tokens) == (9, 3, 12)
    assert served.cache_read_tokens == 2
    assert served.user_id == user.user_id
    # A second close writes nothing and enqueues nothing more.
    assert run_async(holds.hold_settle_async(record=record, now=timezone.now())) is None
    assert UsageReport.objects.count() == 2
    assert len(enqueued) == 2


@pytest.mark.django_db(transaction=True)
def test_refund_and_refusal_write_their_reports(path, enqueued):  # noqa: F811
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    request_id = open_hold(user, "0.5")
    run_async(
        holds.hold_refund_async(
            record=reported_record(user, request_id, status="error"), now=timezone.now()
        )
    )
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    assert_reported(request_id, enqueued)
    enqueued.clear()

    refused = uuid.uuid4()
    run_async(
        holds.usage_record_async(
            record=reported_record(user, refused, status="error"), now=timezone.now()
        )
    )
    assert_reported(refused, enqueued)
    assert UsageLog.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_settle_that_rolls_the_period_writes_the_reports_on_the_general_path(enqueued):
    """The fast statement changes nothing when the period is due; the general path then
    settles, and writes the reports in its transaction."""
    budget = make_budget(max_budget_usd=Decimal("1"), budget_duration_sec=60)
    user = make_user(budget=budget)
    request_id = open_hold(user, "0.5")
    GatewayUser.objects.filter(pk=user.pk).update(
        next_budget_reset_at=timezone.now() - timedelta(seconds=1)
    )
    run_async(holds.hold_settle_async(record=reported_record(user, request_id), now=timezone.now()))
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert_reported(request_id, enqueued)


# --- the policy, with the production defaults -----------------------------------------------


def test_the_non_retryable_set_is_explicit_and_dead_letters_at_once():
    assert frozenset({401, 402, 404, 409, 410, 422}) == reporting.NON_RETRYABLE_STATUSES
    for status in reporting.NON_RETRYABLE_STATUSES:
        assert reporting.verdict_for_status(status) is Verdict.DEAD
    for status in (408, 425, 429, 500, 502, 503, 504, 599):
        assert reporting.verdict_for_status(status) is Verdict.RETRY
    for status in (200, 201, 202, 204):
        assert reporting.verdict_for_status(status) is Verdict.DELIVERED
    for status in (301, 302, 400, 403, 405, 413, 418, 451):
        assert reporting.verdict_for_status(status) is Verdict.DEAD


def test_production_backoff_about_one_second_doubling_eight_tries_about_four_minutes():
    base = settings.OTARI_PLATFORM_REPORT_BACKOFF_SECONDS
    tries = settings.OTARI_PLATFORM_REPORT_MAX_TRIES
    assert (base, tries) == (1.0, 8)
    # The first retry comes after about a second (1 s, stretched by jitter up to 2 s).
    assert reporting.backoff_s(tries_done=1, base_s=base, jitter=0.0) == 1.0
    assert reporting.backoff_s(tries_done=1, base_s=base, jitter=0.999) < 2.0
    # Then doubling: 1, 2, 4, ... 64 s before tries 2..8.
    waits = [reporting.backoff_s(tries_done=n, base_s=base, jitter=0.0) for n in range(1, tries)]
    assert waits == [1, 2, 4, 8, 16, 32, 64]
    # The last try starts between 127 s and 254 s after the first: about four minutes.
    assert sum(waits) == 127
    longest = sum(reporting.backoff_s(tries_done=n, base_s=base, jitter=1.0) for n in range(1, 8))
    assert longest == 254


def test_retry_after_seconds_or_http_date_capped():
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert reporting.retry_after_s("1", now=now) == 1.0
    assert reporting.retry_after_s(" 30 ", now=now) == 30.0
    assert reporting.retry_after_s("Wed, 01 Jan 2025 00:00:12 GMT", now=now) == 12.0
    assert reporting.retry_after_s("Tue, 31 Dec 2024 00:00:00 GMT", now=now) == 0.0
    assert reporting.retry_after_s("999999", now=now) == reporting.RETRY_AFTER_MAX_S
    assert reporting.retry_after_s("soon", now=now) is None
    assert reporting.retry_after_s(None, now=now) is None


def test_last_error_is_truncated():
    assert reporting.truncate("x" * 5000) == "x" * 999 + "…"
    assert reporting.truncate("short") == "short"
