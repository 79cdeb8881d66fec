"""Fixtures for the observability and rate-limit tests: a Redis database of their own,
and a Prometheus text parser."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

# CI runs Redis on 127.0.0.1:6379; each branch of work uses its own database number.
REDIS_URL = os.environ.get("OTARI_TEST_REDIS_URL", "redis://127.0.0.1:6379/8")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis database for the rate limiter (skipped without Redis locally; CI,
    which sets OTARI_REQUIRE_POSTGRES, fails instead)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.ConnectionError:
        if os.environ.get("OTARI_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"needs Redis at {REDIS_URL} (set OTARI_TEST_REDIS_URL)")
    yield REDIS_URL
    client.flushdb()
    client.close()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
