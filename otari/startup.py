"""A worker process's startup (ASGI lifespan): the work its first requests would do.

Measured (docs/PERFORMANCE.md): a fresh worker answered its first generation request in
~350 ms, against ~3 ms for the next ones, because that request paid for

- Django's URL configuration, imported and compiled on the first route it resolves (it
  imports every view, the management API and its OpenAPI machinery);
- the upstream HTTP client: its TLS context (the CA bundle is read and parsed), and the
  modules httpx, httpcore and anyio import on first use;
- the hot path's PostgreSQL pool and its first connection;
- the configuration file and the provider table;
- the Celery app's task registry, which the embedded beat's first tick builds, and that
  tick's jobs;
- the thread Django's synchronous request hooks run in.

`warm_up` does all of that before the worker accepts a connection. Then it freezes the
garbage collector's view of everything allocated so far (`gc.freeze`): those ~200,000
objects (Django, the libraries, the configuration) live as long as the process, and a
full collection that traversed them all took ~50 ms, which at one request at a time was
the p99. After the freeze a collection traverses only what requests allocate.

A step that fails (the database is down at start) is logged and skipped: the worker
starts anyway, and its first requests do that work as they would have without warm-up.

The price catalog is not loaded here: it is read only for a model that has no price
row yet, once per model for the whole deployment (its first use freezes a price row),
and it costs each worker ~12 MiB.

Serve with `--lifespan on` (uvicorn's `auto` runs it too); with `--lifespan off` nothing
here runs and every worker warms up on its first requests, as before.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from collections.abc import Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.urls import resolve

logger = logging.getLogger(__name__)

# Modules the HTTP client imports on its first request, not when it is created. Private
# paths of third-party packages: one that moves is skipped, not an error.
_FIRST_REQUEST_IMPORTS = ("sniffio", "anyio._backends._asyncio", "httpcore._backends.anyio")


def _configuration() -> None:
    from llm_proxy.providers import providers

    providers()


def _imports() -> None:
    # The URL configuration, and a generation route's patterns compiled.
    resolve("/v1/chat/completions")
    for name in _FIRST_REQUEST_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


async def _upstream() -> None:
    from llm_proxy import upstream

    upstream.client()


async def _database() -> None:
    from common import pgpool

    if pgpool.enabled():
        pool = await pgpool.pool()
        await pool.wait(timeout=settings.OTARI_DB_TIMEOUT_SECONDS)


def _beat() -> None:
    from otari.celery import app, embedded_beat_tick

    app.tasks  # noqa: B018 - builds the task registry (Celery finalises its app lazily)
    embedded_beat_tick()


async def _hooks_thread() -> None:
    # The thread a generation request's synchronous ORM calls run in (the general path).
    await sync_to_async(lambda: None)()


async def _run(step: Callable[[], object]) -> None:
    result = step()
    if isinstance(result, Awaitable):
        await result


async def warm_up() -> None:
    """Prepare this worker for its first request (see the module docstring)."""
    started = time.perf_counter()
    for step in (_configuration, _imports, _upstream, _database, _beat, _hooks_thread):
        try:
            await _run(step)
        except Exception:
            logger.warning(
                "warm-up step %s failed; the first requests will do it",
                step.__name__.lstrip("_"),
                exc_info=True,
            )
    # Everything allocated so far lives as long as the process; collect what is garbage,
    # then keep the rest out of every later collection.
    gc.collect()
    gc.freeze()
    logger.info(
        "worker ready in %.0f ms (%d objects frozen out of garbage collection)",
        (time.perf_counter() - started) * 1000,
        gc.get_freeze_count(),
    )


class Lifespan:
    """The ASGI lifespan protocol in front of `app`: warm up at startup."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await warm_up()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
