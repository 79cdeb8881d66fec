"""Target health (issue 15): N failures in a row cool a target down for a while, shared
by every process through Redis, per process without it; Redis down fails open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from llm_proxy.routing import health
from tests.conftest import REPO, run_async

T = "openai:flaky"


def fail(target: str = T, times: int = 1) -> None:
    for _ in range(times):
        run_async(health.record(target, ok=False))


def cooling(*targets: str) -> dict[str, datetime]:
    return run_async(health.cooling(list(targets)))


@pytest.fixture
def short_cooldown(settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 3
    settings.OTARI_ROUTING_COOLDOWN_SECONDS = 1


def test_two_processes_share_the_cooldown_through_redis(health_redis, short_cooldown):
    fail(times=2)
    assert cooling(T) == {}
    # The third failure in a row happens in another gateway process.
    script = (
        "import asyncio; from llm_proxy.routing import health; "
        f"asyncio.run(health.record({T!r}, ok=False))"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=REPO,
        env={
            **os.environ,
            "OTARI_ROUTING_REDIS_URL": health_redis,
            "OTARI_ROUTING_COOLDOWN_SECONDS": "1",
            "OTARI_CONFIG": "",
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    before = datetime.now(UTC)
    ends = cooling(T, "openai:fine")
    assert list(ends) == [T]
    assert before < ends[T] <= before + timedelta(seconds=1.5)
    assert health.cooling_sync([T, "openai:fine"]) == ends  # explain sees the same state
    # The cooldown ends by itself; one more failure cools it again (half-open) ...
    time.sleep(1.1)
    assert cooling(T) == {}
    fail()
    assert T in cooling(T)
    # ... until a success resets it.
    run_async(health.record(T, ok=True))
    assert cooling(T) == {}
    fail(times=2)
    assert cooling(T) == {}


def test_a_success_in_between_breaks_the_run(health_redis, short_cooldown):
    fail(times=2)
    run_async(health.record(T, ok=True))
    fail(times=2)
    assert cooling(T) == {}
    fail()
    assert T in cooling(T)


def test_per_process_without_redis(settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 2
    settings.OTARI_ROUTING_COOLDOWN_SECONDS = 30
    with time_machine.travel(datetime(2026, 5, 1, 12, 0, tzinfo=UTC), tick=False) as clock:
        fail()
        assert cooling(T) == {}
        fail()
        assert cooling(T) == {T: datetime(2026, 5, 1, 12, 0, 30, tzinfo=UTC)}
        assert health.cooling_sync([T]) == cooling(T)
        clock.shift(timedelta(seconds=30))
        assert cooling(T) == {}
        run_async(health.record(T, ok=True))
        fail()
        assert cooling(T) == {}


def test_redis_down_fails_open_and_says_so_once(settings, caplog):
    settings.OTARI_ROUTING_REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 1
    fail(times=2)
    assert cooling(T) == {}
    assert health.cooling_sync([T]) == {}
    warnings = [r for r in caplog.records if "Routing health not shared" in r.getMessage()]
    assert len(warnings) == 1
