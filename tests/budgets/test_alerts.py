"""Budget alerts (beyond the reference): thresholds crossed by settlement, delivered once
per user, threshold and period to a webhook and/or email, retried when that fails."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from django.core import mail

from budgets import alerting
from budgets.exceptions import InvalidAlertSettings
from budgets.models import BudgetAlert
from budgets.services import accounts, alerts
from tests.budgets.ledger import charge
from tests.factories import make_budget, make_key, make_user, priced

pytestmark = pytest.mark.calendar

PROMPT = "Say hello to the test suite"  # 27 characters: 7 prompt tokens


def wait_until(condition, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


# --- the arithmetic -------------------------------------------------------------------------


def test_a_threshold_is_crossed_by_exactly_the_settlement_that_reaches_it():
    limit = Decimal("10")
    crossed = [
        alerting.thresholds_crossed(
            [80, 100], spend_after_usd=Decimal(after), charge_usd=Decimal("0.5"), limit_usd=limit
        )
        for after in ("7.5", "8", "8.5", "9.99", "10", "11")
    ]
    assert crossed == [[], [80], [], [], [100], []]
    # One big request can cross both.
    assert alerting.thresholds_crossed(
        [100, 80], spend_after_usd=Decimal("10.2"), charge_usd=Decimal("3"), limit_usd=limit
    ) == [80, 100]
    # No limit, a zero limit or a free request: nothing to cross.
    for limit_usd, charge_usd in ((None, "1"), (Decimal(0), "1"), (limit, "0")):
        assert not alerting.thresholds_crossed(
            [80], spend_after_usd=Decimal("9"), charge_usd=Decimal(charge_usd), limit_usd=limit_usd
        )
    assert alerting.thresholds_reached([50, 80, 100], spend_usd=Decimal("8"), limit_usd=limit) == [
        50,
        80,
    ]


def test_alert_settings_are_validated_without_echoing_them(db):
    budget = make_budget(max_budget_usd=Decimal("5"))
    assert budget.alert_thresholds_pct == [80, 100]
    assert not budget.alerts_enabled  # no target yet
    for bad in (
        {"alert_thresholds_pct": [0]},
        {"alert_thresholds_pct": [80, "90"]},
        {"alert_thresholds_pct": [True]},
        {"alert_thresholds_pct": list(range(1, 20))},
        {"alert_webhook_url": "ftp://secret-host.example/x"},
        {"alert_emails": ["not-an-address-secret"]},
    ):
        with pytest.raises(InvalidAlertSettings) as refused:
            accounts.budget_update(budget_id=budget.pk, **bad)
        assert refused.value.status == 422
        assert "secret" not in refused.value.message
    budget = accounts.budget_update(
        budget_id=budget.pk,
        alert_thresholds_pct=[100, 50, 50],
        alert_emails=["ops@example.com", "ops@example.com"],
    )
    assert (budget.alert_thresholds_pct, budget.alert_emails) == ([50, 100], ["ops@example.com"])
    assert budget.alerts_enabled


# --- through HTTP: concurrency and periods --------------------------------------------------


def _burst(gateway, secret: str, model: str, count: int) -> list[httpx.Response]:
    """`count` requests released at the same moment."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response] = []

    def one() -> None:
        with gateway.client(secret) as client:
            barrier.wait()
            responses.append(
                client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "max_tokens": 20,
                        "messages": [{"role": "user", "content": PROMPT}],
                    },
                )
            )

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


@pytest.mark.postgres
def test_32_concurrent_requests_crossing_80_percent_send_one_webhook_per_period(
    gateway, receiver, time_machine
):
    time_machine.move_to(datetime(2025, 1, 15, 12, tzinfo=UTC), tick=True)
    # $1 per million tokens both ways: each request costs 27 tokens = $0.000027; with a
    # limit of $0.001, 80% is crossed by the 30th request and 100% is never reached.
    model = priced("gpt-4o-mini", "1", "1")
    budget = make_budget(
        max_budget_usd=Decimal("0.001"),
        reset_alignment="calendar_month",
        alert_webhook_url=receiver.url,
    )
    user = make_user(budget=budget, user_id="alice")
    _, secret = make_key(user)

    responses = _burst(gateway, secret, model, 32)
    assert [r.status_code for r in responses] == [200] * 32
    calls = receiver.wait_for(1)
    assert len(calls) == 1
    payload = calls[0]["json"]
    alert = BudgetAlert.objects.get()
    assert payload == {
        "type": "budget.threshold_reached",
        "alert_id": alert.pk,
        "user": "alice",
        "budget": budget.pk,
        "threshold": 80,
        "spend": payload["spend"],
        "limit": "0.001",
        "currency": "USD",
        "period_start": user.budget_started_at.isoformat(),
        "period_end": "2025-02-01T00:00:00+00:00",
        "created_at": payload["created_at"],
    }
    # The spend when the alert was raised: at least the crossing, at most all 32.
    assert Decimal("0.000810") <= Decimal(payload["spend"]) <= Decimal("0.000864")
    assert calls[0]["headers"]["X-Otari-Alert-Id"] == str(alert.pk)
    user.refresh_from_db()
    assert user.spend_usd == Decimal("0.000864")
    wait_until(lambda: BudgetAlert.objects.get().status == "delivered")

    # The next period: spend starts again from zero, and crossing 80% alerts again.
    time_machine.move_to(datetime(2025, 2, 1, 0, 5, tzinfo=UTC), tick=True)
    responses = _burst(gateway, secret, model, 32)
    assert [r.status_code for r in responses] == [200] * 32
    calls = receiver.wait_for(2)
    assert len(calls) == 2
    assert calls[1]["json"]["threshold"] == 80
    assert calls[1]["json"]["period_start"] == "2025-02-01T00:00:00+00:00"
    assert calls[1]["json"]["period_end"] == "2025-03-01T00:00:00+00:00"
    assert BudgetAlert.objects.count() == 2


@pytest.mark.postgres
def test_alerts_are_emailed_through_the_mail_backend(gateway, settings):
    model = priced("gpt-4o-mini", "1", "1")
    budget = make_budget(
        max_budget_usd=Decimal("0.0001"),
        alert_thresholds_pct=[50],
        alert_emails=["ops@example.com", "lead@example.com"],
    )
    user = make_user(budget=budget, user_id="bob")
    _, secret = make_key(user)
    for _ in range(3):  # 27, 54, 81 micro-dollars: 50% crossed by the second
        assert gateway.chat(secret, model=model, max_tokens=20).status_code == 200

    wait_until(lambda: len(mail.outbox) == 1)
    time.sleep(0.3)
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["ops@example.com", "lead@example.com"]
    assert message.from_email == settings.OTARI_ALERT_FROM_EMAIL
    assert message.subject == "[otari] bob has used 50% of their budget"
    assert "$0.000054 of their $0.0001 limit" in message.body
    wait_until(lambda: BudgetAlert.objects.get().email_delivered_at is not None)


@pytest.mark.postgres
def test_a_budget_without_alert_targets_raises_no_alert(gateway):
    model = priced("gpt-4o-mini", "1", "1")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.0001")))
    _, secret = make_key(user)
    for _ in range(3):
        assert gateway.chat(secret, model=model, max_tokens=20).status_code == 200
    assert alerts.budget_alerts_sweep().created == []
    assert not BudgetAlert.objects.exists()


# --- delivery: retries, permanent failures, duplicates ---------------------------------------


@pytest.fixture
def crossed(db, receiver):
    """A user at 90% of their limit, with the alert for 80% recorded (not yet delivered)."""
    budget = make_budget(
        max_budget_usd=Decimal("10"),
        budget_duration_sec=86400,
        alert_webhook_url=receiver.url,
        alert_emails=["ops@example.com"],
    )
    user = make_user(budget=budget, user_id="carol")
    charge(user.pk, Decimal("9"), datetime.now(UTC))
    with pytest.MonkeyPatch.context() as patch:
        # Deliver by hand in these tests: keep the enqueued task from running.
        patch.setattr(alerts, "enqueue_detached_on_commit", lambda *a, **k: None)
        (alert,) = alerts.budget_alerts_check(user_id=user.pk)
    assert alert.threshold_pct == 80
    return alert


def test_a_transient_failure_is_retried_and_a_delivered_channel_is_not_repeated(crossed, receiver):
    receiver.statuses.extend([503])
    mail.outbox.clear()
    first = alerts.budget_alert_deliver(alert_id=crossed.pk)
    assert first.status == "pending"
    assert 0.5 <= first.retry_in_s <= 1.0
    # The email went out; the webhook did not.
    assert len(mail.outbox) == 1
    crossed.refresh_from_db()
    assert (crossed.attempts, crossed.last_error) == (1, "webhook: HTTP 503")
    assert crossed.email_delivered_at is not None
    assert crossed.webhook_delivered_at is None

    second = alerts.budget_alert_deliver(alert_id=crossed.pk)
    assert (second.status, second.retry_in_s) == ("delivered", None)
    assert len(receiver.calls) == 2
    assert len(mail.outbox) == 1  # not sent twice
    # Done is done.
    assert alerts.budget_alert_deliver(alert_id=crossed.pk).status == "delivered"
    assert len(receiver.calls) == 2


def test_retries_stop_after_the_last_attempt(crossed, receiver):
    receiver.statuses.extend([500] * 10)
    delays = []
    for _ in range(alerts.ALERT_MAX_ATTEMPTS):
        outcome = alerts.budget_alert_deliver(alert_id=crossed.pk)
        delays.append(outcome.retry_in_s)
    assert outcome.status == "failed"
    # Doubling backoff (with jitter in the upper half), then no more attempts.
    assert delays[-1] is None
    for attempt, delay in enumerate(delays[:-1]):
        assert 2**attempt / 2 <= delay <= 2**attempt
    assert len(receiver.calls) == alerts.ALERT_MAX_ATTEMPTS
    assert alerts.budget_alert_deliver(alert_id=crossed.pk).status == "failed"
    assert len(receiver.calls) == alerts.ALERT_MAX_ATTEMPTS


def test_a_permanent_failure_is_not_retried(crossed, receiver):
    receiver.statuses.extend([404])
    outcome = alerts.budget_alert_deliver(alert_id=crossed.pk)
    assert (outcome.status, outcome.retry_in_s) == ("failed", None)
    crossed.refresh_from_db()
    assert crossed.last_error == "webhook: HTTP 404"


def test_an_unreachable_webhook_is_retried(crossed):
    type(crossed).objects.filter(pk=crossed.pk).update(webhook_url="http://127.0.0.1:9/hook")
    outcome = alerts.budget_alert_deliver(alert_id=crossed.pk)
    assert outcome.status == "pending"
    assert outcome.retry_in_s is not None
    crossed.refresh_from_db()
    assert crossed.last_error == "webhook: ConnectError"


@pytest.mark.postgres
def test_two_workers_given_the_same_alert_deliver_it_once(transactional_db, receiver):
    budget = make_budget(max_budget_usd=Decimal("10"), alert_webhook_url=receiver.url)
    user = make_user(budget=budget)
    charge(user.pk, Decimal("8"), datetime.now(UTC))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alerts, "enqueue_detached_on_commit", lambda *a, **k: None)
        (alert,) = alerts.budget_alerts_check(user_id=user.pk)
    receiver.delay_s = 0.5
    barrier = threading.Barrier(4)
    outcomes = []

    def deliver() -> None:
        from django.db import connection

        barrier.wait()
        outcomes.append(alerts.budget_alert_deliver(alert_id=alert.pk).status)
        connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(receiver.calls) == 1
    assert sorted(outcomes) == ["delivered", "pending", "pending", "pending"]
    alert.refresh_from_db()
    assert (alert.status, alert.attempts) == ("delivered", 1)


@pytest.mark.postgres
def test_without_a_broker_a_retry_is_delivered_in_the_background(transactional_db, receiver):
    """The embedded mode: the task runs in a background thread, and its retry is
    scheduled with a delay rather than run at once."""
    budget = make_budget(max_budget_usd=Decimal("10"), alert_webhook_url=receiver.url)
    user = make_user(budget=budget)
    receiver.statuses.extend([502])
    charge(user.pk, Decimal("8.5"), datetime.now(UTC))
    started = time.monotonic()
    (alert,) = alerts.budget_alerts_check(user_id=user.pk)

    wait_until(lambda: len(receiver.calls) == 2)
    assert time.monotonic() - started >= 0.5  # the first backoff
    wait_until(lambda: BudgetAlert.objects.get(pk=alert.pk).status == "delivered")


# --- the sweep: reached without a crossing, and lost deliveries ------------------------------


def test_the_sweep_alerts_on_thresholds_reached_without_a_crossing(db, receiver, time_machine):
    time_machine.move_to(datetime(2025, 6, 1, 12, tzinfo=UTC), tick=False)
    budget = make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=86400)
    user = make_user(budget=budget)
    other = make_user(budget=budget)
    charge(user.pk, Decimal("9"), datetime.now(UTC))
    charge(other.pk, Decimal("1"), datetime.now(UTC))
    # Alerts configured after the spend happened.
    accounts.budget_update(budget_id=budget.pk, alert_webhook_url=receiver.url)
    with pytest.MonkeyPatch.context() as patch:
        enqueued = []
        patch.setattr(alerts, "enqueue_detached_on_commit", lambda task, *a: enqueued.append(a))
        sweep = alerts.budget_alerts_sweep()
        assert [(a.user_id, a.threshold_pct) for a in sweep.created] == [(user.pk, 80)]
        assert alerts.budget_alerts_sweep().created == []  # once
        # The limit is lowered under the spend: 100% is now reached too.
        accounts.budget_update(budget_id=budget.pk, max_budget_usd=Decimal("8.5"))
        assert [a.threshold_pct for a in alerts.budget_alerts_sweep().created] == [100]
        # A top-up raises the limit; already-raised alerts stay raised, none repeat.
        accounts.user_topup_set(
            user_id=user.pk, amount_usd=Decimal("100"), expires_at=datetime(2026, 1, 1, tzinfo=UTC)
        )
        assert alerts.budget_alerts_sweep().created == []
    assert len(enqueued) == 2


def test_the_sweep_redrives_a_delivery_that_was_lost(db, receiver, time_machine):
    time_machine.move_to(datetime(2025, 6, 1, 12, tzinfo=UTC), tick=False)
    budget = make_budget(max_budget_usd=Decimal("10"), alert_webhook_url=receiver.url)
    user = make_user(budget=budget)
    charge(user.pk, Decimal("8"), datetime.now(UTC))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alerts, "enqueue_detached_on_commit", lambda *a, **k: None)  # lost
        alerts.budget_alerts_check(user_id=user.pk)
        redriven = []
        patch.setattr(alerts, "enqueue", lambda task, *a, **k: redriven.append(a))
        assert alerts.budget_alerts_sweep().redriven == 0
        time_machine.move_to(datetime(2025, 6, 1, 12, 11, tzinfo=UTC), tick=False)
        assert alerts.budget_alerts_sweep().redriven == 1
    (alert_id,) = redriven[0]
    assert alerts.budget_alert_deliver(alert_id=alert_id).status == "delivered"
    assert len(receiver.calls) == 1


def test_the_sweep_redrives_an_attempt_whose_worker_died_once_its_lease_ran_out(
    db, receiver, time_machine
):
    """A worker killed with -9 mid-delivery leaves the alert claimed (attempts 1, a lease
    in the future) with no task left anywhere: the first sweep after the lease ran out
    sends it again, without waiting for the 10-minute re-drive of untouched alerts."""
    start = datetime(2025, 6, 1, 12, tzinfo=UTC)
    time_machine.move_to(start, tick=False)
    budget = make_budget(max_budget_usd=Decimal("10"), alert_webhook_url=receiver.url)
    user = make_user(budget=budget)
    charge(user.pk, Decimal("8"), datetime.now(UTC))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alerts, "enqueue_detached_on_commit", lambda *a, **k: None)
        (alert,) = alerts.budget_alerts_check(user_id=user.pk)
        # The row as the killed worker's claim left it.
        BudgetAlert.objects.filter(pk=alert.pk).update(
            attempts=1, last_attempt_at=start, leased_until=start + timedelta(seconds=120)
        )
        redriven = []
        patch.setattr(alerts, "enqueue", lambda task, *a, **k: redriven.append(a))
        time_machine.move_to(start + timedelta(seconds=119), tick=False)
        assert alerts.budget_alerts_sweep().redriven == 0  # it may still be running
        time_machine.move_to(start + timedelta(seconds=121), tick=False)
        assert alerts.budget_alerts_sweep().redriven == 1
    assert redriven == [(alert.pk,)]
    assert alerts.budget_alert_deliver(alert_id=alert.pk).status == "delivered"
    alert.refresh_from_db()
    assert (alert.status, alert.attempts, len(receiver.calls)) == ("delivered", 2, 1)
