"""A platform-mode stack in real processes: a Celery worker (and beat) on Redis, and the
gateway under uvicorn, all on the test database, reporting to a fake platform in this
process. Shared by the delivery and outage tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from tests.conftest import REPO, database_url, start_server_process
from tests.fake_platform import GATEWAY_TOKEN, FakePlatform, attempt

BROKER_URL = os.environ.get("OTARI_TEST_PLATFORM_BROKER_URL", "redis://127.0.0.1:6379/7")
USER_TOKEN = "ptok-dora-user-token"
CELERY = (sys.executable, "-m", "celery", "-A", "otari")


def stack_env(platform: FakePlatform, broker_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of the stack. Backoff and re-drive are quick, so
    that the retry tests take seconds; the try count is production's (8)."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "otari.settings",
        "CELERY_BROKER_URL": broker_url,
        "OTARI_PLATFORM_URL": platform.url,
        "OTARI_PLATFORM_TOKEN": GATEWAY_TOKEN,
        "OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS": "1",
        "OTARI_PLATFORM_REPORT_BACKOFF_SECONDS": "0.02",
        "OTARI_PLATFORM_REPORT_REDRIVE_AFTER_SECONDS": "1",
        "OTARI_BEAT_INTERVAL_SECONDS": "1",
        "CELERY_BEAT_SCHEDULE_FILENAME": str(tmp / "celerybeat-schedule"),
        **extra,
    }


def broker_flush(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()  # this test run's own Redis database
        return True
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@dataclass
class Celery:
    env: dict[str, str]
    name: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self) -> subprocess.Popen:
        self.processes["worker"] = subprocess.Popen(
            [
                *CELERY,
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
                f"{self.name}-{os.getpid()}-{time.monotonic_ns()}@%h",
            ],
            cwd=REPO,
            env=self.env,
        )
        return self.processes["worker"]

    def start_beat(self) -> None:
        self.processes["beat"] = subprocess.Popen(
            [*CELERY, "beat", "--loglevel", "warning", "--max-interval", "1"],
            cwd=REPO,
            env=self.env,
        )

    def kill_worker(self) -> None:
        worker = self.processes.pop("worker")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes.clear()


def one_attempt(platform: FakePlatform, fake_provider) -> None:
    """Every resolve answers one attempt on the fake provider, with a fresh attempt id."""
    platform.users[USER_TOKEN] = "dora"
    platform.fresh_ids = True
    platform.attempts = [
        attempt("att", "openai", "gpt-4o-mini", api_base=fake_provider.base_url),
    ]


def platform_request(url: str, *, stream: bool = False, timeout_s: float = 30) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {USER_TOKEN}"},
        json={
            "model": "openai:gpt-4o-mini",
            "max_tokens": 16,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say hello to the test suite"}],
        },
        timeout=timeout_s,
    )


__all__ = [
    "BROKER_URL",
    "USER_TOKEN",
    "Celery",
    "broker_flush",
    "one_attempt",
    "platform_request",
    "stack_env",
    "start_server_process",
]
