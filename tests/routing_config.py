"""A configuration with routing in it: the session's providers and prices plus configured
aliases and policies (OTARI_CONFIG's `aliases` and `routing.policies`), for the tests of
the management API, the command and the console (each wraps it in a fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROUTING_YAML = """
aliases:
  house: openai:gpt-4o-mini
routing:
  policies:
    balanced:
      select:
        - router: weighted
          candidates: [openai:gpt-4o, anthropic:claude-sonnet-4-5]
          weights: {openai:gpt-4o: 3, anthropic:claude-sonnet-4-5: 1}
        - default: openai:gpt-4o
      on_failure: [openai:gpt-4o-mini]
    thrifty:
      select:
        - when: {budget_used_pct: {gte: 80}}
          target: openai:gpt-4o-mini
        - default: openai:gpt-4o
      on_failure: [anthropic:claude-haiku-4-5]
"""


@contextmanager
def routing_configured(base: Path, directory: Path) -> Iterator[Path]:
    """The configuration at `base` with ROUTING_YAML added, in force until the end of
    the block (the gateway in the test process reads the same settings)."""
    from django.conf import settings

    from common.config import gateway_config

    path = directory / "otari-routing.yaml"
    path.write_text(base.read_text() + ROUTING_YAML)
    previous = settings.OTARI_CONFIG
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    try:
        yield path
    finally:
        settings.OTARI_CONFIG = previous
        gateway_config.cache_clear()
