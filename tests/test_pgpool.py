"""The hot path's pool tells a database that is down from one statement that failed
(common/pgpool.py; docs/RELIABILITY.md)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors
from psycopg_pool import PoolTimeout

from budgets.services import holds
from common import pgpool
from common.exceptions import ServiceUnavailable
from tests.conftest import run_async


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (errors.AdminShutdown(), True),  # 57P01: the server is shutting down
        (errors.CannotConnectNow(), True),  # 57P03: the server is starting
        (errors.TooManyConnections(), True),  # 53300
        (psycopg.OperationalError("connection refused"), True),  # no SQLSTATE: client side
        (PoolTimeout(), True),
        (errors.DeadlockDetected(), False),  # 40P01: one statement's failure
        (errors.SerializationFailure(), False),
        (errors.QueryCanceled(), False),  # 57014: a statement cancelled
    ],
)
def test_only_an_unreachable_database_counts_as_unavailable(error, unavailable):
    assert pgpool.is_unavailable(error) is unavailable


@pytest.mark.postgres
def test_a_cancelled_statement_does_not_turn_the_next_ones_away(transactional_db):
    """A deadlock or a cancelled statement used to mark the database down for a second,
    failing every request of the process in that second with a 503."""

    async def scenario() -> dict:
        with pytest.raises(errors.QueryCanceled):
            await pgpool.fetchone("SELECT pg_cancel_backend(pg_backend_pid())", {})
        return await pgpool.fetchone("SELECT 1 AS one", {})

    assert run_async(scenario()) == {"one": 1}


@pytest.mark.postgres
def test_an_unreachable_database_fails_the_next_statements_at_once(transactional_db):
    async def scenario() -> None:
        with pytest.raises(ServiceUnavailable):
            await pgpool.fetchone("SELECT pg_terminate_backend(pg_backend_pid())", {})
        with pytest.raises(ServiceUnavailable):
            await pgpool.fetchone("SELECT 1 AS one", {})

    try:
        run_async(scenario())
    finally:
        pgpool._down_until = 0.0


@pytest.mark.parametrize(
    "statement",
    [
        holds._ADMIT_CHECKED_SQL,
        holds.ADMIT.sql,
        holds.SETTLE.sql,
        holds.REFUND.sql,
        holds.RECORD.sql,
    ],
    ids=["ADMIT_CHECKED", "ADMIT", "SETTLE", "REFUND", "RECORD"],
)
def test_the_hot_paths_statements_fit_psycopgs_conversion_cache(statement):
    """Past the limit, psycopg parses the statement's text again at every execution."""
    from psycopg import _queries  # psycopg's own limit, private: pinned here

    assert pgpool.CACHED_STATEMENT_MAX_BYTES == _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(statement.encode()) <= pgpool.CACHED_STATEMENT_MAX_BYTES
