"""With no broker (the embedded default), the gateway process runs the periodic jobs
itself, in the background, at most once per interval (otari.celery.embedded_beat_tick)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgets.models import BudgetResetLog, GatewayUser, Hold
from otari.celery import embedded_beat_reset
from tests.budgets.ledger import assert_books_balance, charge, open_hold
from tests.factories import make_budget, make_key, make_user, priced


def wait_until(condition, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture
def embedded_beat(settings):
    settings.CELERY_BROKER_URL = ""
    settings.OTARI_EMBEDDED_BEAT = True
    settings.OTARI_BEAT_INTERVAL_SECONDS = 60
    embedded_beat_reset()
    yield
    settings.OTARI_EMBEDDED_BEAT = False
    embedded_beat_reset()


@pytest.mark.postgres
def test_without_a_broker_requests_start_the_periodic_jobs(gateway, embedded_beat, settings):
    model = priced("gpt-4o-mini")
    ttl = timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS)
    leaky = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    stale = open_hold(leaky.pk, Decimal("0.5"), datetime.now(UTC) - ttl - timedelta(seconds=5))
    rolling = make_user(budget=make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=1))
    charge(rolling.pk, Decimal("1"), datetime.now(UTC))
    time.sleep(1.1)  # its window ends
    caller = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    _, secret = make_key(caller)

    assert gateway.chat(secret, model=model).status_code == 200
    wait_until(lambda: Hold.objects.get(pk=stale.request_id).status == Hold.Status.EXPIRED)
    wait_until(lambda: BudgetResetLog.objects.filter(user=rolling, previous_spend_usd=1).exists())
    assert GatewayUser.objects.get(pk=leaky.pk).reserved_usd == 0
    assert_books_balance(leaky.pk)

    # Within the interval, further requests start nothing.
    another = open_hold(leaky.pk, Decimal("0.25"), datetime.now(UTC) - ttl - timedelta(seconds=5))
    assert gateway.chat(secret, model=model).status_code == 200
    time.sleep(0.5)
    assert Hold.objects.get(pk=another.request_id).status == Hold.Status.OPEN


@pytest.mark.postgres
def test_with_a_broker_the_gateway_leaves_the_jobs_to_celery_beat(gateway, embedded_beat, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/6"
    model = priced("gpt-4o-mini")
    ttl = timedelta(seconds=settings.OTARI_HOLD_TTL_SECONDS)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    stale = open_hold(user.pk, Decimal("0.5"), datetime.now(UTC) - ttl - timedelta(seconds=5))
    _, secret = make_key(user)

    assert gateway.chat(secret, model=model).status_code == 200
    time.sleep(0.5)
    assert Hold.objects.get(pk=stale.request_id).status == Hold.Status.OPEN
