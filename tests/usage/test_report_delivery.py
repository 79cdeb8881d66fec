"""The delivery policy of platform usage reports in a real Celery worker on Redis, with
the gateway in its own process and a fake platform (docs/SPEC.md §7): the explicit
non-retryable set, retries with backoff, Retry-After, the bound, the re-drive of dead
letters by command and admin action."""

from __future__ import annotations

import itertools
import time
from io import StringIO

import pytest
from django.core.management import call_command

from tests.fake_platform import GATEWAY_TOKEN, FakePlatform, Reply
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
from usage.reporting import NON_RETRYABLE_STATUSES

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(django_db_setup, gateway_config_file, fake_provider, tmp_path_factory):
    """The fake platform, a worker and beat, and the gateway: started once for the module."""
    if not broker_flush(BROKER_URL):
        pytest.skip(f"no Redis at {BROKER_URL}")
    with FakePlatform() as platform:
        env = stack_env(platform, BROKER_URL, tmp_path_factory.mktemp("beat"))
        celery = Celery(env, "otari-report-test")
        celery.start_worker()
        celery.start_beat()
        gateway = start_server_process(gateway_config_file, **env)
        try:
            yield platform, gateway.url
        finally:
            gateway.kill()
            celery.stop()


@pytest.fixture
def platform(stack, transactional_db, fake_provider) -> FakePlatform:
    fake, _ = stack
    with fake._lock:
        fake.posts.clear()
        fake.usage_script.clear()
        fake.usage_script_by_id.clear()
        fake.usage_default = Reply()
    one_attempt(fake, fake_provider)
    return fake


@pytest.fixture
def gateway_url(stack) -> str:
    return stack[1]


def report_of_one_request(gateway_url: str) -> UsageReport:
    response = platform_request(gateway_url)
    assert response.status_code == 200, response.text
    return UsageReport.objects.get(request_id=response.headers["X-Otari-Request-Id"])


def settled(report: UsageReport, timeout_s: float = 30) -> UsageReport:
    """The report once it is delivered or dead."""
    wait_until(
        lambda: UsageReport.objects.get(pk=report.pk).delivery_status != "pending", timeout_s
    )
    return UsageReport.objects.get(pk=report.pk)


@pytest.mark.parametrize("status", sorted(NON_RETRYABLE_STATUSES))
def test_a_non_retryable_status_is_posted_once_and_dead_lettered(platform, gateway_url, status):
    platform.usage_script.append(
        Reply(status=status, body={"detail": f"rejected with {status}: " + "x" * 3000})
    )
    report = settled(report_of_one_request(gateway_url))

    assert report.delivery_status == "dead"
    assert (report.last_status_code, report.attempts) == (status, 1)
    assert report.last_error.startswith('{"detail": "rejected with')
    assert len(report.last_error) == 1000  # truncated
    assert report.dead_at is not None
    # Nothing more comes: not a retry, not a re-drive (beat runs every second).
    time.sleep(2.5)
    assert len(platform.posts_for(report.correlation_id)) == 1
    assert UsageReport.objects.get(pk=report.pk).attempts == 1


def test_another_4xx_is_dead_lettered_at_once(platform, gateway_url):
    platform.usage_script.append(Reply(status=400, body={"detail": "malformed"}))
    report = settled(report_of_one_request(gateway_url))
    assert (report.delivery_status, report.last_status_code, report.attempts) == ("dead", 400, 1)
    time.sleep(1.5)
    assert len(platform.posts_for(report.correlation_id)) == 1


def test_500_then_200_is_delivered_after_a_retry(platform, gateway_url):
    platform.usage_script.append(Reply(status=500, body={"detail": "try later"}))
    report = settled(report_of_one_request(gateway_url))

    assert report.delivery_status == "delivered"
    assert (report.attempts, report.last_status_code, report.last_error) == (2, 200, "")
    posts = platform.posts_for(report.correlation_id)
    assert [p.status for p in posts] == [500, 200]
    assert platform.accepted()[report.correlation_id] == 1
    # The report itself, as pushed.
    assert posts[1].body["status"] == "success"
    assert posts[1].body["is_final_attempt"] is True
    assert posts[1].body["usage"]["completion_tokens"] == 16
    assert posts[1].headers["x-gateway-token"] == GATEWAY_TOKEN


def test_429_with_retry_after_is_retried_no_sooner(platform, gateway_url):
    platform.usage_script.append(Reply(status=429, retry_after="1"))
    report = settled(report_of_one_request(gateway_url))

    assert report.delivery_status == "delivered"
    first, second = platform.posts_for(report.correlation_id)
    assert (first.status, second.status) == (429, 200)
    # The backoff alone would have retried after 20-40 ms.
    assert second.at - first.at >= 1.0


def test_a_timeout_is_retried(platform, gateway_url):
    # Longer than OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS (1 s): the worker gives up on it.
    platform.usage_script.append(Reply(status=503, delay_s=2))
    report = settled(report_of_one_request(gateway_url))
    assert (report.delivery_status, report.attempts) == ("delivered", 2)


def test_a_permanent_503_stops_after_the_bound_and_is_dead_lettered(platform, gateway_url):
    platform.usage_default = Reply(status=503, body={"detail": "down for maintenance"})
    report = settled(report_of_one_request(gateway_url))

    assert report.delivery_status == "dead"
    assert (report.attempts, report.last_status_code) == (8, 503)
    assert "down for maintenance" in report.last_error
    posts = platform.posts_for(report.correlation_id)
    assert len(posts) == 8
    # Waits doubled (base 20 ms here, with jitter up to twice as long).
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(posts)]
    assert gaps[-1] > gaps[0]
    assert gaps[-1] >= 0.02 * 2**6
    time.sleep(2.5)
    assert len(platform.posts_for(report.correlation_id)) == 8


def test_dead_letters_are_redriven_by_the_command(platform, gateway_url, settings):
    platform.usage_script.extend([Reply(status=402), Reply(status=409)])
    dead_402 = settled(report_of_one_request(gateway_url))
    dead_409 = settled(report_of_one_request(gateway_url))
    assert (dead_402.last_status_code, dead_409.last_status_code) == (402, 409)
    # The command runs in this process, without a broker: the same task code delivers
    # from a background thread.
    settings.CELERY_BROKER_URL = ""
    settings.OTARI_PLATFORM_URL = platform.url
    settings.OTARI_PLATFORM_TOKEN = GATEWAY_TOKEN

    out = StringIO()
    call_command("redrive_usage_reports", "--status", "402", "--dry-run", stdout=out)
    assert (
        out.getvalue().strip()
        == "redrive_usage_reports (dry run): 1 dead report(s) would be re-driven"
    )
    assert UsageReport.objects.get(pk=dead_402.pk).delivery_status == "dead"

    out = StringIO()
    call_command("redrive_usage_reports", "--status", "402", stdout=out)
    assert out.getvalue().strip() == "redrive_usage_reports: re-drove 1 dead report(s)"
    assert settled(dead_402).delivery_status == "delivered"
    assert UsageReport.objects.get(pk=dead_409.pk).delivery_status == "dead"
    assert platform.accepted()[dead_402.correlation_id] == 1

    call_command("redrive_usage_reports", stdout=StringIO())
    assert settled(dead_409).delivery_status == "delivered"


def test_the_admin_lists_dead_letters_and_redrives_them(platform, gateway_url, settings, client):
    from django.contrib.auth.models import User

    platform.usage_script.append(Reply(status=410, body={"detail": "gone"}))
    dead = settled(report_of_one_request(gateway_url))
    settings.CELERY_BROKER_URL = ""
    settings.OTARI_PLATFORM_URL = platform.url
    settings.OTARI_PLATFORM_TOKEN = GATEWAY_TOKEN
    admin = User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests-only")
    client.force_login(admin)

    listing = client.get(
        "/admin/usage/usagereport/", {"delivery_status__exact": "dead", "last_status_code": "410"}
    )
    assert listing.status_code == 200
    page = listing.content.decode()
    assert dead.correlation_id in page
    assert "410" in page

    detail = client.get(f"/admin/usage/usagereport/{dead.pk}/change/")
    assert detail.status_code == 200
    assert "gone" in detail.content.decode()
    # History is never edited here.
    assert client.post(f"/admin/usage/usagereport/{dead.pk}/change/", {}).status_code == 403
    assert client.post(f"/admin/usage/usagereport/{dead.pk}/delete/", {}).status_code == 403

    redriven = client.post(
        "/admin/usage/usagereport/",
        {"action": "redrive_reports", "_selected_action": [str(dead.pk)]},
        follow=True,
    )
    assert redriven.status_code == 200
    assert "Re-drove 1 dead report" in redriven.content.decode()
    assert settled(dead).delivery_status == "delivered"
    assert platform.accepted()[dead.correlation_id] == 1
