"""Fixtures for the routing tests: providers configured (the session's config file:
openai, anthropic, dead, ...), routing health per process and forgotten between tests,
and a Redis database of their own for the shared health state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_proxy.routing import health


@pytest.fixture(autouse=True)
def routing_providers(gateway_config_file: Path, settings) -> Iterator[None]:
    settings.OTARI_ROUTING_REDIS_URL = ""
    health.reset()
    yield
    health.reset()


@pytest.fixture
def health_redis(redis_url: str, settings) -> str:
    """Routing health shared through a real, empty Redis database (tests/conftest.py's)."""
    settings.OTARI_ROUTING_REDIS_URL = redis_url
    return redis_url
