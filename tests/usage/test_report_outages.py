"""Nothing is lost when the broker or a worker dies (docs/SPEC.md §7): the outbox row is
committed with the usage row, and the periodic re-drive sends what lost its message.

The broker test stops a Redis server of its own on another port, never the machine's
shared one.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fake_platform import FakePlatform, Reply
from tests.usage.platform_stack import (
    BROKER_URL,
    Celery,
    broker_flush,
    one_attempt,
    platform_request,
    stack_env,
    start_server_process,
)
from usage.models import UsageReport

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_broker_down_during_100_requests_every_report_delivered_once(
    transactional_db, own_redis, gateway_config_file, fake_provider, tmp_path
):
    with FakePlatform() as platform:
        one_attempt(platform, fake_provider)
        env = stack_env(platform, own_redis.url, tmp_path)
        celery = Celery(env, "otari-outage-test")
        celery.start_worker()
        celery.start_beat()
        gateway = start_server_process(gateway_config_file, **env)
        try:

            def timed_request(_: int) -> tuple[int, float]:
                started = time.monotonic()
                response = platform_request(gateway.url)
                return response.status_code, time.monotonic() - started

            def burst(count: int) -> list[float]:
                with ThreadPoolExecutor(max_workers=4) as pool:
                    timed = list(pool.map(timed_request, range(count)))
                assert [status for status, _ in timed] == [200] * count
                return [seconds for _, seconds in timed]

            # The broker up: the reports are delivered at once.
            baseline = burst(20)
            platform.wait_accepted(20, timeout_s=30)

            own_redis.stop()
            outage = burst(100)
            # Every request was served, and the broker being down did not slow them: a
            # publish waiting on kombu's connection retries would add 0.6 s or more.
            print(  # noqa: T201 - the figures for the report
                f"\n4 concurrent clients: broker up median {statistics.median(baseline) * 1000:.0f}"
                f" ms, max {max(baseline) * 1000:.0f} ms; broker down median "
                f"{statistics.median(outage) * 1000:.0f} ms, max {max(outage) * 1000:.0f} ms"
            )
            assert statistics.median(outage) < 2 * statistics.median(baseline) + 0.1
            assert max(outage) < 2.0
            assert UsageReport.objects.count() == 120
            assert UsageReport.objects.filter(delivery_status="pending").count() == 100

            own_redis.start()  # empty: whatever was queued before is gone too
            accepted = platform.wait_accepted(120, timeout_s=120)
            time.sleep(3)  # a few more re-drive rounds: none may send anything again
            accepted = platform.accepted()
            assert len(accepted) == 120
            assert set(accepted.values()) == {1}
            assert len(platform.posts) == 120  # not even an unanswered duplicate
            wait_until(
                lambda: UsageReport.objects.filter(delivery_status="delivered").count() == 120
            )
        finally:
            gateway.kill()
            celery.stop()


def test_a_worker_killed_mid_push_is_delivered_after_restart_once(
    transactional_db, gateway_config_file, fake_provider, tmp_path
):
    if not broker_flush(BROKER_URL):
        pytest.skip(f"no Redis at {BROKER_URL}")
    with FakePlatform() as platform:
        one_attempt(platform, fake_provider)
        # The platform takes the first push and never answers it.
        platform.usage_script.append(Reply(hang=True))
        env = stack_env(platform, BROKER_URL, tmp_path)
        celery = Celery(env, "otari-kill-test")
        celery.start_worker()
        celery.start_beat()
        gateway = start_server_process(gateway_config_file, **env)
        try:
            response = platform_request(gateway.url)
            assert response.status_code == 200
            report = UsageReport.objects.get(request_id=response.headers["X-Otari-Request-Id"])
            wait_until(lambda: len(platform.posts) == 1, timeout_s=30)

            celery.kill_worker()  # SIGKILL, mid-push
            report.refresh_from_db()
            assert (report.delivery_status, report.attempts) == ("pending", 1)
            assert report.leased_until is not None

            celery.start_worker()
            wait_until(lambda: UsageReport.objects.get(pk=report.pk).delivery_status == "delivered")
            report.refresh_from_db()
            assert report.attempts == 2
            # The platform booked it once: the first push was never answered.
            assert platform.accepted() == {report.correlation_id: 1}
            assert [p.status for p in platform.posts_for(report.correlation_id)] == [None, 200]
        finally:
            platform.release_hangs()
            gateway.kill()
            celery.stop()
