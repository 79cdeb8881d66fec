"""Fixtures for the routing tests: providers configured (the session's config file:
openai, anthropic, dead, ...), routing health per process and forgotten between tests,
and a Redis database of their own for the shared health state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from llm_proxy.routing import health

# Each branch of work uses its own Redis database number.
REDIS_URL = os.environ.get("OTARI_TEST_REDIS_URL", "redis://127.0.0.1:6379/8")


@pytest.fixture(autouse=True)
def routing_providers(gateway_config_file: Path, settings) -> Iterator[None]:
    settings.OTARI_ROUTING_REDIS_URL = ""
    health.reset()
    yield
    health.reset()


@pytest.fixture
def health_redis(settings) -> Iterator[str]:
    """Routing health shared through a real, empty Redis database."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.ConnectionError:
        pytest.skip(f"needs Redis at {REDIS_URL} (set OTARI_TEST_REDIS_URL)")
    settings.OTARI_ROUTING_REDIS_URL = REDIS_URL
    yield REDIS_URL
    client.flushdb()
    client.close()
