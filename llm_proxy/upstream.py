"""The one shared httpx.AsyncClient of this process (connection pooling to providers)."""

from __future__ import annotations

import asyncio

import httpx

_client: httpx.AsyncClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None


def client() -> httpx.AsyncClient:
    """The process's upstream client, created on first use in the serving event loop.

    Pooled keep-alive connections are what make a gateway cheap: a new TLS handshake per
    request would cost more than everything else it does. Timeouts are per provider and
    set on each request (providers.base.Provider.timeout).
    """
    global _client, _client_loop
    loop = asyncio.get_running_loop()
    if _client is None or _client_loop is not loop:
        # A client's connections belong to the loop that opened them; only tests run
        # several loops in one process.
        _client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            # Streams are forwarded byte for byte: ask providers not to compress them.
            headers={"Accept-Encoding": "identity"},
            follow_redirects=False,
        )
        _client_loop = loop
    return _client
