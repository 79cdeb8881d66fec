"""The provider interface: what the gateway needs from one upstream kind.

A provider turns (API, body) into an HTTP request to its upstream. It knows its wire
format's path, auth headers and quirks; it does not know about money, streams or
translation (llm_proxy.gateway and llm_proxy.formats do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import httpx

if TYPE_CHECKING:
    from otari.config import ProviderConfig


class Provider:
    kind: ClassVar[str]
    default_api_base: ClassVar[str]
    # The client APIs this kind speaks natively: "chat", "responses", "messages",
    # "embeddings". A request in another format is translated to one of these.
    native_apis: ClassVar[frozenset[str]]

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.api_key = config.api_key
        self.api_base = (config.api_base or self.default_api_base).rstrip("/")
        self.timeout = httpx.Timeout(
            config.timeout_s,
            # Connecting is quick or it is not going to happen.
            connect=min(config.timeout_s, 10.0),
        )

    def __repr__(self) -> str:  # never the key
        return f"<{type(self).__name__} {self.name} {self.api_base}>"

    def path(self, api: str) -> str:
        raise NotImplementedError

    def headers(self, api: str) -> dict[str, str]:
        raise NotImplementedError

    def build_request(
        self, client: httpx.AsyncClient, api: str, body: dict[str, Any]
    ) -> httpx.Request:
        return client.build_request(
            "POST",
            self.api_base + self.path(api),
            json=body,
            headers=self.headers(api),
            timeout=self.timeout,
        )

    def secrets(self) -> list[str]:
        """Strings that must never leave the gateway (for redaction)."""
        return [self.api_key] if self.api_key else []
