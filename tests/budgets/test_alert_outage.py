"""Alerts raised while the broker is down (issue 19, item 5): the alert row is the outbox,
and the gateway's publisher keeps the deliveries it could not publish and sends them as
soon as the broker is back, with no wait for the 10-minute re-drive, logging the outage
once rather than a traceback per alert.

The broker is a Redis server of the test's own, stopped and started again (empty) by pid;
a real Celery worker delivers to a webhook receiver on loopback. No beat runs: nothing but
the gateway's publisher can send the alerts."""

from __future__ import annotations

import os
import time
from decimal import Decimal

import pytest

from budgets.models import BudgetAlert
from tests.budgets.webhook import WebhookReceiver
from tests.conftest import Gateway, database_url, start_server_process
from tests.factories import make_budget, make_key, make_user, priced
from tests.usage.platform_stack import Celery

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USERS = ("ann", "ben", "cat")


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_alerts_raised_while_the_broker_is_down_are_delivered_once_it_is_back(
    transactional_db, own_redis, gateway_config_file, fake_provider, tmp_path
):
    with WebhookReceiver() as receiver:
        model = priced("gpt-4o-mini", "1", "1")  # $0.000027 a request
        budget = make_budget(
            max_budget_usd=Decimal("0.0001"),
            alert_thresholds_pct=[50],  # crossed by each user's second request
            alert_webhook_url=receiver.url,
        )
        secrets = [make_key(make_user(budget=budget, user_id=name))[1] for name in USERS]
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "DJANGO_SETTINGS_MODULE": "otari.settings",
            "CELERY_BROKER_URL": own_redis.url,
            # The rate limiter would use the broker's Redis: this test is about the broker.
            "OTARI_RATELIMIT_REDIS_URL": "",
        }
        celery = Celery(env, "otari-alert-outage")
        celery.start_worker()
        log_path = tmp_path / "gateway.log"
        gateway = start_server_process(
            gateway_config_file,
            log_path=log_path,
            CELERY_BROKER_URL=own_redis.url,
            OTARI_RATELIMIT_REDIS_URL="",
        )
        try:
            own_redis.stop()
            client = Gateway(url=gateway.url, fake=fake_provider)
            for secret in secrets:
                for _ in range(2):
                    started = time.monotonic()
                    assert client.chat(secret, model=model, max_tokens=20).status_code == 200
                    # Served without waiting on the broker.
                    assert time.monotonic() - started < 2
            wait_until(lambda: BudgetAlert.objects.count() == len(USERS))
            time.sleep(3)  # several probes of the broker fail meanwhile
            assert set(BudgetAlert.objects.values_list("status", "attempts")) == {("pending", 0)}
            assert receiver.calls == []

            own_redis.start()  # empty: nothing was queued while it was down
            back = time.monotonic()
            wait_until(lambda: len(receiver.calls) >= len(USERS))
            delay_s = time.monotonic() - back
            wait_until(lambda: BudgetAlert.objects.filter(status="delivered").count() == len(USERS))
            time.sleep(1)  # nothing more arrives
        finally:
            gateway.kill()
            celery.stop()
        print(f"\nalerts delivered {delay_s:.1f} s after the broker was back")  # noqa: T201
        # Soon after: the publisher's probe (1 s) and the worker's reconnection, far from
        # the sweep's 10 minutes.
        assert delay_s < 20
        assert sorted(call["json"]["user"] for call in receiver.calls) == sorted(USERS)
        assert set(BudgetAlert.objects.values_list("attempts", flat=True)) == {1}

        log = log_path.read_text()
        assert log.count("broker unreachable") == 1, log
        assert log.count("broker reachable again") == 1, log
        assert "sent 3 waiting task(s)" in log
        assert "Traceback" not in log, log
