"""The provider interface: what the gateway needs from one upstream kind.

A provider turns (API, body) into an HTTP request to its upstream. It knows its wire
format's path, auth headers and quirks; it does not know about money, streams or
translation (llm_proxy.pipeline and llm_proxy.formats do).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from django.core.exceptions import ImproperlyConfigured

from llm_proxy.errors import ProviderError, provider_error_for_status
from usage import catalog

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from common.config import ProviderConfig


class Provider:
    kind: ClassVar[str]
    default_api_base: ClassVar[str]
    # The client APIs this kind speaks natively: "chat", "responses", "messages",
    # "embeddings". A request in another format is translated to one of these.
    native_apis: ClassVar[frozenset[str]]
    # The price catalog's provider for every endpoint of this kind, whatever its host
    # (usage.catalog, rule 3); None for kinds that front servers of any vendor.
    catalog_provider: ClassVar[str | None] = None
    # The kind-specific keys its configuration section may have (e.g. bedrock's region);
    # None: the kind has none and, as before they existed, ignores unknown keys.
    options: ClassVar[frozenset[str] | None] = None
    # True for kinds whose URL names the model and the stream mode, as their bodies carry
    # neither (bedrock, gemini, vertex); they implement `credentials`, `model_url` and
    # `signed_headers`.
    model_in_url: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig) -> None:
        if self.options is not None and set(config.options) - self.options:
            raise ImproperlyConfigured(
                f"providers.{config.name}: unknown option(s) for the {self.kind} kind: "
                + ", ".join(sorted(set(config.options) - self.options))
            )
        self.name = config.name
        # The APIs this instance serves natively: the kind's, or the subset the
        # configuration names (`apis:`), e.g. an OpenAI-compatible server without the
        # Responses API, whose /v1/responses requests are then translated to chat.
        self.apis = self.native_apis
        if config.apis is not None:
            unknown = set(config.apis) - self.native_apis
            if unknown:
                raise ImproperlyConfigured(
                    f"providers.{config.name}.apis: the {self.kind} kind does not speak "
                    + ", ".join(sorted(unknown))
                )
            self.apis = frozenset(config.apis)
        self.api_key = config.api_key
        self._catalog_configured = config.catalog_provider
        self._secrets = config.secret_values()
        # Parsed upstream URLs, by API: parsing one costs more than the rest of building
        # the request (docs/PERFORMANCE.md).
        self._urls: dict[str, httpx.URL] = {}
        self.api_base = (config.api_base or self.default_api_base).rstrip("/")
        self.timeout = httpx.Timeout(
            config.timeout_s,
            # Connecting is quick or it is not going to happen.
            connect=min(config.timeout_s, 10.0),
        )

    def __repr__(self) -> str:  # never the key
        return f"<{type(self).__name__} {self.name} {self.api_base}>"

    def catalog_provider_id(self) -> str | None:
        """Whose catalog prices apply to this instance's models (usage.catalog)."""
        return catalog.catalog_provider_for(
            configured=self._catalog_configured,
            api_base=self.api_base,
            kind_provider=self.catalog_provider,
        )

    def path(self, api: str) -> str:
        raise NotImplementedError

    def headers(self, api: str) -> dict[str, str]:
        raise NotImplementedError

    def forwarded_headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """Client headers to pass on with a native (untranslated) request."""
        return {}

    def url(self, api: str) -> httpx.URL:
        url = self._urls.get(api)
        if url is None:
            url = self._urls[api] = httpx.URL(self.api_base + self.path(api))
        return url

    def target(self, api: str, body: dict[str, Any]) -> tuple[httpx.URL, dict[str, Any]]:
        """The URL and body of a request: the body's `model` is the caller's model name;
        a kind whose URL depends on it (azure's deployments) overrides this."""
        return self.url(api), body

    def build_request(
        self,
        client: httpx.AsyncClient,
        api: str,
        body: dict[str, Any],
        extra_headers: dict[str, str] | None = None,
    ) -> httpx.Request:
        headers = self.headers(api)
        if extra_headers:
            headers = {**headers, **extra_headers}
        url, body = self.target(api, body)
        return client.build_request("POST", url, json=body, headers=headers, timeout=self.timeout)

    async def upstream_request(
        self,
        client: httpx.AsyncClient,
        api: str,
        body: dict[str, Any],
        extra_headers: dict[str, str] | None,
        *,
        model: str,
        stream: bool,
    ) -> httpx.Request:
        """The HTTP request of one attempt (what the gateway sends).

        Async so that kinds with expiring credentials (bedrock, vertex) can refresh them
        off the event loop first; kinds whose URL names the model or the stream mode
        (`model_in_url`) take `model` and `stream` from here, as their bodies carry
        neither. Raises ProviderError when no request can be made (no credentials).
        """
        if not self.model_in_url:
            return self.build_request(client, api, body, extra_headers)
        # Credentials first: vertex learns its project, part of the URL, with its token.
        credentials = await self.credentials()
        url = self.model_url(model, stream=stream)
        # The exact bytes sent, as bedrock signs them.
        content = json.dumps(body, separators=(",", ":")).encode()
        headers = self.signed_headers(credentials, url, content)
        return client.build_request(
            "POST", url, content=content, headers=headers, timeout=self.timeout
        )

    async def credentials(self) -> Any:
        """A `model_in_url` kind's current credentials, refreshed first if they are about
        to expire (never on the event loop)."""
        raise NotImplementedError

    def model_url(self, model: str, *, stream: bool) -> str:
        """A `model_in_url` kind's URL for `model`, streamed or not."""
        raise NotImplementedError

    def signed_headers(self, credentials: Any, url: str, content: bytes) -> dict[str, str]:
        """A `model_in_url` kind's headers for a request of `content` to `url`."""
        raise NotImplementedError

    def stream_chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The streamed answer as server-sent events (a kind with another framing,
        such as Bedrock's binary event stream, re-frames it here)."""
        return response.aiter_bytes()

    def retry_after(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """The Retry-After to pass on with a 429 (seconds, or an HTTP date)."""
        return headers.get("retry-after")

    def upstream_error(
        self, status: int, headers: Mapping[str, str], body: bytes, *, echoes: list[str]
    ) -> ProviderError:
        """What the caller sees for an upstream error status (`echoes`: the request's
        texts, never shown back)."""
        return provider_error_for_status(
            status,
            body,
            retry_after=self.retry_after(headers, body),
            secrets=self.secrets(),
            echoes=echoes,
        )

    def secrets(self) -> list[str]:
        """Strings that must never leave the gateway (for redaction)."""
        return self._secrets
