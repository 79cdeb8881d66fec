"""An asyncio psycopg connection pool for the request hot path on PostgreSQL.

Django's ORM is synchronous: from an async view every query costs a hop to a thread and
back, which measured at 2-3x the CPU of the same statement sent from the event loop
(docs/PERFORMANCE.md). The hot path therefore sends its few statements
(budgets.selectors.caller_load and rates_current; budgets.services hold_open_async,
hold_settle_async, hold_refund_async and usage_record_async) through this pool, in
autocommit: each is one statement and one round trip. Everything else uses the ORM.

The pool is created lazily, per event loop (a server process has one; tests may start
several), from Django's own connection settings, so it always talks to the same database
as the ORM, test databases included. Behind a pooler in transaction mode
(OTARI_DB_POOLER=transaction) it prepares no statements; it keeps no other session state
than the time zone, which PgBouncer carries over.

When the database is down (docs/RELIABILITY.md), a request fails fast instead of waiting:
a checkout waits at most OTARI_DB_TIMEOUT_SECONDS, and once a statement has failed for
want of the database, the next ones fail at once for a second (one request per second
and process probes for the database's return). A connection idle for a while is checked
before use, so that the first requests after a restart do not fail on connections the
restart broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from django.db.utils import InterfaceError as DjangoInterfaceError
from django.db.utils import OperationalError as DjangoOperationalError
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from common.exceptions import ServiceUnavailable

_pool: AsyncConnectionPool | None = None
_pool_loop: asyncio.AbstractEventLoop | None = None

# The error classes that may mean "the database cannot be reached", from either pool.
# They also cover errors that do not (psycopg's OperationalError includes a deadlock or a
# cancelled statement), so a handler catches these and then asks `is_unavailable`.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    PoolTimeout,
    DjangoOperationalError,
    DjangoInterfaceError,
)
# SQLSTATEs of an unreachable database: connection exceptions (class 08), insufficient
# resources (53: too many connections, out of memory or disk), and the server shutting
# down or starting (57P01-57P05). Not 40P01 (deadlock) nor 57014 (statement cancelled):
# those are one statement's failure, and must not turn the process away from a database
# that is up.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P")


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` (one of UNAVAILABLE) says the database is unreachable."""
    if isinstance(exc, PoolTimeout | DjangoInterfaceError):
        return True
    error = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if not isinstance(error, psycopg.Error):
        return isinstance(exc, DjangoOperationalError)
    if isinstance(error, psycopg.InterfaceError):
        return True
    # No SQLSTATE: the client failed to connect or lost the connection.
    sqlstate = error.sqlstate
    return sqlstate is None or sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)


# Until when (time.monotonic()) statements fail at once: the database was just found down.
_down_until = 0.0
DOWN_PROBE_INTERVAL_S = 1.0
# Connections this process has checked out of the pool right now.
_in_use = 0
# Statements this process's pool has completed: while they keep coming, the database is
# serving, and a checkout that times out is in a queue, not facing an outage.
_completed = 0
# How long a probe may take to connect (a busy host forks a backend slowly).
PROBE_TIMEOUT_S = 2.0
_probe: asyncio.Task | None = None
# How long a request waits for a connection while the pool is busy (not down).
BUSY_WAIT_S = 30.0
# A connection idle longer than this is checked before use (one round trip).
CHECK_IDLE_AFTER_S = 1.0
# psycopg converts a query's text (its placeholders to $1, $2...) once and caches the
# result only for a text of at most this many bytes (psycopg's MAX_CACHED_STATEMENT_LENGTH);
# a longer one is parsed again at every execution, which cost ADMIT_CHECKED 0.06 ms of
# CPU each time when it grew past it. The hot path's statements stay under it
# (tests/test_pgpool.py).
CACHED_STATEMENT_MAX_BYTES = 4096
_returned_at: weakref.WeakKeyDictionary[AsyncConnection, float] = weakref.WeakKeyDictionary()


def enabled() -> bool:
    """True when the database is PostgreSQL (the fast path's only dialect)."""
    return settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def _conninfo() -> dict[str, Any]:
    db = connections["default"].settings_dict
    params = {
        "dbname": db["NAME"],
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
    }
    for key, value in (db.get("OPTIONS") or {}).items():
        # Django-only options; everything else (sslmode, ...) is libpq's.
        if key not in ("pool", "server_side_binding", "isolation_level", "assume_role"):
            params[key] = value
    params = {k: v for k, v in params.items() if v is not None}
    if settings.OTARI_DB_POOLER == "transaction":
        # psycopg prepares a statement on the server after a few executions, and the next
        # execution may find another server connection behind the pooler ("prepared
        # statement does not exist"). Direct connections keep preparing: the hot path's few
        # statements are then parsed and planned once per connection.
        params["prepare_threshold"] = None
    return params


async def _configure(conn: AsyncConnection) -> None:
    # UTC sessions, as Django's own connections are: timestamps compare the same way.
    # Behind a transaction pooler too: PgBouncer tracks TimeZone per client and sets it on
    # whichever server connection it hands the client next.
    await conn.execute("SET TIME ZONE 'UTC'")


async def _check(conn: AsyncConnection) -> None:
    """Check a connection that has been idle a while (a busy pool's are not: no round
    trip on the hot path); the pool discards one that fails and hands out another."""
    if time.monotonic() - _returned_at.get(conn, 0.0) > CHECK_IDLE_AFTER_S:
        await AsyncConnectionPool.check_connection(conn)


async def pool() -> AsyncConnectionPool:
    global _pool, _pool_loop
    loop = asyncio.get_running_loop()
    if _pool is not None and _pool_loop is loop:
        return _pool
    # A pool belongs to the loop it was opened on. A new loop (only in tests) gets a new
    # pool; the old one died with its loop.
    new = AsyncConnectionPool(
        kwargs={**_conninfo(), "autocommit": True, "row_factory": dict_row},
        configure=_configure,
        check=_check,
        timeout=settings.OTARI_DB_TIMEOUT_SECONDS,
        min_size=1,
        max_size=settings.OTARI_HOTPATH_POOL_SIZE,
        open=False,
        name="otari-hotpath",
    )
    await new.open()
    if _pool is not None and _pool_loop is loop:
        # Another request of this loop opened one while we were opening ours.
        await new.close()
        return _pool
    _pool, _pool_loop = new, loop
    return new


async def fetchone(sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Run one statement in autocommit and return its first row, if any. Raises
    ServiceUnavailable when the database cannot be reached."""
    async with _connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone() if cur.description else None


async def fetchall(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one statement in autocommit and return all its rows."""
    async with _connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


@contextlib.asynccontextmanager
async def _connection() -> AsyncIterator[AsyncConnection]:
    """A pooled connection, failing fast while the database is known to be down."""
    global _completed, _down_until, _in_use
    if time.monotonic() < _down_until:
        raise ServiceUnavailable
    try:
        p = await pool()
        conn = await _checkout(p)
    except UNAVAILABLE as exc:
        if not is_unavailable(exc):
            raise
        _down_until = time.monotonic() + DOWN_PROBE_INTERVAL_S
        raise ServiceUnavailable from exc
    _in_use += 1
    try:
        yield conn
        _completed += 1
    except UNAVAILABLE as exc:
        if not is_unavailable(exc):
            raise
        _down_until = time.monotonic() + DOWN_PROBE_INTERVAL_S
        raise ServiceUnavailable from exc
    finally:
        _in_use -= 1
        # Stamped here, not in the pool's `reset` callback: with one, every return goes
        # through a worker task of the pool, and on a loaded event loop the connection
        # waits there, counted nowhere, while requests time out waiting for it.
        _returned_at[conn] = time.monotonic()
        await p.putconn(conn)


async def _checkout(p: AsyncConnectionPool) -> AsyncConnection:
    """A connection within OTARI_DB_TIMEOUT_SECONDS, or PoolTimeout. Except when the pool
    is merely busy, and the wait is for a connection to come back or to be opened, not
    for a database that is down: then it goes on (up to BUSY_WAIT_S).

    Busy: this process holds connections, or completed statements during the wait, or
    else a probe connects to the database. Holding alone is not proof: a connection the
    pool has just handed to another waiting request is counted nowhere until that request
    runs, and a pool that has just been opened is still connecting; on a loaded host
    both outlast the timeout, and taking them for an outage failed the whole process
    for a second (the load drill, docs/RELIABILITY.md). A database that is down refuses
    the probe at once. Once a statement has failed for want of the database, the wait
    ends at its next timeout."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        completed = _completed
        try:
            return await p.getconn(timeout=settings.OTARI_DB_TIMEOUT_SECONDS)
        except PoolTimeout:
            now = time.monotonic()
            if now < _down_until or now > deadline:
                raise
            if not (_in_use or _completed != completed or await _reachable()):
                raise


async def _reachable() -> bool:
    """Whether the database takes a new connection now. One probe at a time per
    process: the requests that ask meanwhile share its answer."""
    global _probe
    if _probe is None or _probe.done() or _probe.get_loop() is not asyncio.get_running_loop():
        _probe = asyncio.ensure_future(_connects())
    return await asyncio.shield(_probe)


async def _connects() -> bool:
    try:
        conn = await asyncio.wait_for(
            AsyncConnection.connect(**_conninfo(), autocommit=True), PROBE_TIMEOUT_S
        )
    except (psycopg.OperationalError, TimeoutError):
        return False
    await conn.close()
    return True
