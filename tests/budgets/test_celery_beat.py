"""The periodic jobs in a real Celery worker and beat, against Redis (database 6 unless
OTARI_TEST_BROKER_URL says otherwise), on the test database, with the gateway in its own
process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
from django.conf import settings

from budgets.models import BudgetAlert, BudgetResetLog, GatewayUser, Hold
from budgets.selectors import books_drift_list
from tests.budgets.ledger import assert_books_balance, charge
from tests.budgets.webhook import WebhookReceiver
from tests.conftest import REPO, database_url, start_server_process
from tests.factories import make_budget, make_key, make_user, priced
from usage.models import UsageLog

BROKER_URL = os.environ.get("OTARI_TEST_BROKER_URL", "redis://127.0.0.1:6379/6")

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def wait_until(condition, timeout_s: float = 45) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_the_beat_schedule_names_registered_tasks():
    from otari.celery import app

    app.loader.import_default_modules()
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert names == {
        "budgets.roll_due_periods",
        "budgets.expire_stale_holds",
        "budgets.sweep_alerts",
        "usage.redrive_reports",
    }
    assert names <= set(app.tasks)
    assert "budgets.deliver_alert" in app.tasks
    assert "usage.push_report" in app.tasks
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["schedule"] == settings.OTARI_BEAT_INTERVAL_SECONDS == 60


@pytest.fixture
def celery_env(tmp_path: Path) -> dict[str, str]:
    broker = redis.Redis.from_url(BROKER_URL)
    try:
        broker.flushdb()  # this test run's own Redis database: leftovers of a killed run
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {BROKER_URL}")
    finally:
        broker.close()
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "otari.settings",
        "CELERY_BROKER_URL": BROKER_URL,
        "OTARI_BEAT_INTERVAL_SECONDS": "1",
        "CELERY_BEAT_SCHEDULE_FILENAME": str(tmp_path / "celerybeat-schedule"),
    }


@pytest.fixture
def worker_and_beat(transactional_db, celery_env) -> Iterator[None]:
    """`celery -A otari worker` and `celery -A otari beat`, as documented."""
    celery = [sys.executable, "-m", "celery", "-A", "otari"]
    processes = [
        subprocess.Popen(
            [
                *celery,
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "--loglevel",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"otari-test-{os.getpid()}@%h",
            ],
            cwd=REPO,
            env=celery_env,
        ),
        subprocess.Popen(
            [*celery, "beat", "--loglevel", "warning", "--max-interval", "1"],
            cwd=REPO,
            env=celery_env,
        ),
    ]
    yield
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_a_hold_left_by_a_killed_gateway_is_released_by_beat_and_worker(
    worker_and_beat, gateway_config_file
):
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="victim")
    _, secret = make_key(user)
    model = priced("hang")
    gateway = start_server_process(
        gateway_config_file, OTARI_HOLD_TTL_SECONDS="2", CELERY_BROKER_URL=BROKER_URL
    )

    def doomed_request() -> None:
        # The gateway is killed under it.
        with contextlib.suppress(httpx.TransportError):
            httpx.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {secret}"},
                json={"model": model, "messages": [{"role": "user", "content": "hello"}]},
                timeout=20,
            )

    client = threading.Thread(target=doomed_request)
    try:
        client.start()
        wait_until(lambda: Hold.objects.filter(user=user).exists(), timeout_s=10)
    finally:
        gateway.kill()  # SIGKILL: the request never closes its hold
    client.join(timeout=10)
    hold = Hold.objects.get(user=user)
    user.refresh_from_db()
    assert hold.status == Hold.Status.OPEN
    assert user.reserved_usd == hold.amount_usd > 0

    wait_until(lambda: Hold.objects.get(pk=hold.pk).status == Hold.Status.EXPIRED)
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == 0
    # The process died mid-request: no usage row (docs/SPEC.md §3.4), and the books balance.
    assert not UsageLog.objects.filter(user=user).exists()
    assert_books_balance(user.pk)
    assert books_drift_list() == []


def test_periods_roll_on_the_beat_schedule_without_any_request(worker_and_beat):
    budget = make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=2)
    user = make_user(budget=budget)
    charge(user.pk, Decimal("1.5"), datetime.now(UTC))
    first_window = GatewayUser.objects.get(pk=user.pk).budget_started_at

    wait_until(lambda: BudgetResetLog.objects.filter(user=user, previous_spend_usd=1.5).exists())
    log = BudgetResetLog.objects.get(user=user, previous_spend_usd=1.5)
    # On the grid of the first window, however late the beat ran.
    assert (log.reset_at - first_window).total_seconds() % 2 == 0
    user.refresh_from_db()
    assert user.spend_usd == 0


def test_an_alert_raised_in_the_gateway_is_delivered_once_by_the_worker(
    worker_and_beat, gateway_config_file
):
    with WebhookReceiver() as receiver:
        model = priced("gpt-4o-mini", "1", "1")  # $0.000027 a request
        budget = make_budget(
            max_budget_usd=Decimal("0.0001"),
            alert_thresholds_pct=[50],
            alert_webhook_url=receiver.url,
        )
        user = make_user(budget=budget, user_id="dora")
        _, secret = make_key(user)
        gateway = start_server_process(gateway_config_file, CELERY_BROKER_URL=BROKER_URL)
        try:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                for _ in range(3):
                    response = client.post(
                        "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {secret}"},
                        json={
                            "model": model,
                            "max_tokens": 20,
                            "messages": [
                                {"role": "user", "content": "Say hello to the test suite"}
                            ],
                        },
                    )
                    assert response.status_code == 200
            calls = receiver.wait_for(1, timeout_s=45)
        finally:
            gateway.kill()
        # Several beat sweeps ran meanwhile: none of them repeated it.
        time.sleep(2)
        assert len(receiver.calls) == 1
        assert calls[0]["json"]["user"] == "dora"
        assert calls[0]["json"]["threshold"] == 50
        wait_until(lambda: BudgetAlert.objects.get().status == BudgetAlert.Status.DELIVERED)
