"""OTARI_DB_POOLER: behind a pooler in transaction mode the gateway keeps no state in a
PostgreSQL session (docs/OPERATIONS.md, "Several hosts"). CI also runs the money tests
through a real PgBouncer in transaction mode (.ci/run)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from common import pgpool
from tests.conftest import REPO

# What the session this statement runs in has prepared, this statement included once
# psycopg prepares it (after a few executions on one connection).
PREPARED = "SELECT count(*) AS n FROM pg_prepared_statements"


async def _prepared_after_repeats() -> int:
    try:
        return max([(await pgpool.fetchone(PREPARED, {}))["n"] for _ in range(12)])
    finally:
        await (await pgpool.pool()).close()


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize(("pooler", "prepares"), [("none", True), ("transaction", False)])
def test_the_hot_path_prepares_statements_only_without_a_transaction_pooler(
    settings, pooler, prepares
):
    """A statement prepared in one server session is missing from the next one a
    transaction pooler hands out: psycopg's automatic preparation is off behind one."""
    settings.OTARI_DB_POOLER = pooler
    # A loop of its own: the hot path's pool is made for it, with these settings.
    assert (asyncio.run(_prepared_after_repeats()) > 0) is prepares


def test_an_unknown_pooler_is_refused_at_startup():
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "otari.settings", "OTARI_DB_POOLER": "yes"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "OTARI_DB_POOLER must be none or transaction" in result.stderr
