"""Expiring provider credentials, refreshed off the event loop and ahead of expiry.

Cloud credentials (AWS role sessions, Google OAuth tokens) are loaded and refreshed by
their SDKs with blocking I/O (a metadata server, STS, a token endpoint). The gateway
must neither block its event loop on that nor pay for it on every request, so a
`Refresher` keeps the current credential and:

- serves it as long as it is fresh (the common case: a time comparison);
- once it is within `ahead_s` of expiring but still usable, serves it and refreshes in
  a worker thread in the background, so no request waits;
- when there is none yet, or it is too close to expiry to use, waits for a refresh
  (in a worker thread), once, however many requests are waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from common.exceptions import GatewayError
from llm_proxy.errors import ProviderError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Below this much life left a credential is not sent: a request signed with it could
# reach the provider after it expired.
_MIN_LIFE = timedelta(seconds=30)


class CredentialsMissing(ProviderError):
    """A cloud kind could not obtain credentials (its chain, file or token endpoint);
    each kind says whose in its `message`."""

    code = "provider_credentials_missing"


class Refresher(Generic[T]):
    """`load()` returns a credential and when it expires (None: never); it blocks, and
    runs in a worker thread. It raises a GatewayError the request fails with; any other
    exception is logged and the request fails with `failure`. See the module docstring."""

    def __init__(
        self,
        load: Callable[[], tuple[T, datetime | None]],
        *,
        ahead_s: float,
        failure: type[GatewayError],
    ) -> None:
        self._load = load
        self._failure = failure
        self._ahead = timedelta(seconds=ahead_s)
        self._value: T | None = None
        self._expires_at: datetime | None = None
        self._pending: asyncio.Future[T] | None = None
        self.loads = 0  # how many times load() ran (observability and tests)

    @property
    def current(self) -> T | None:
        """The credential last loaded, if any (never loads)."""
        return self._value

    def _life(self, now: datetime) -> timedelta | None:
        return None if self._expires_at is None else self._expires_at - now

    async def get(self) -> T:
        value = self._value
        if value is not None:
            life = self._life(datetime.now(UTC))
            if life is None or life > self._ahead:
                return value
            if life > _MIN_LIFE:
                self._start()
                return value
        # Shielded: a request cancelled while waiting must not cancel the refresh the
        # others are waiting for.
        return await asyncio.shield(self._start())

    def _start(self) -> asyncio.Future[T]:
        """The refresh under way, or a new one: one at a time, however many ask."""
        pending = self._pending
        if pending is None or pending.done() or pending.get_loop() is not _running_loop():
            pending = self._pending = asyncio.ensure_future(self._reload())
            # A background refresh nobody awaits: its failure is logged in _reload.
            pending.add_done_callback(lambda task: task.cancelled() or task.exception())
        return pending

    async def _reload(self) -> T:
        self.loads += 1
        try:
            value, expires_at = await asyncio.to_thread(self._load)
        except GatewayError:
            raise
        except Exception as exc:
            logger.exception("refreshing provider credentials failed")
            raise self._failure from exc
        self._value, self._expires_at = value, expires_at
        return value


def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
