"""The `azure` kind: Azure OpenAI (an Azure OpenAI or AI Foundry resource).

```yaml
providers:
  azure:
    kind: azure
    api_base: "https://my-resource.openai.azure.com"   # the resource's endpoint
    api_key: "${AZURE_OPENAI_API_KEY}"                  # sent as `api-key`
    # azure_ad_token: "${AZURE_OPENAI_AD_TOKEN}"        # or an Entra ID token (Bearer)
    api_version: v1                # default; or a dated version, e.g. "2024-10-21"
    deployments:                   # model name (as callers write it) -> deployment name
      gpt-4o: prod-gpt4o
      gpt-4o-mini: mini
```

Two URL schemes, chosen by `api_version`:
- `v1` (the default): the v1 API, `{endpoint}/openai/v1/chat/completions` (and
  `/responses`, `/embeddings`), with the deployment named in the body's `model`.
- a dated version: deployment URLs,
  `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...` (and
  `/embeddings`). The Responses API has no deployment URL: it is
  `{endpoint}/openai/responses?api-version=...` with the deployment in `model`, and needs
  a version that has it (2025-03-01-preview or later); with an older one, set
  `apis: [chat, embeddings]` and /v1/responses requests are translated to chat.

A model without an entry in `deployments` is sent to the deployment of the same name
(Azure's portal suggests naming deployments after their model). The answer names the
model the deployment runs (e.g. `gpt-4o-2024-08-06`); usage, errors (`{"error": {"code",
"message"}}`, 429 with Retry-After) and streams are OpenAI's, so the openai-kind formats
read them. Prices: the catalog's `azure` provider (usage.catalog) for the model name the
caller wrote, so `azure:gpt-4o` is priced as Azure's gpt-4o whatever its deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from django.core.exceptions import ImproperlyConfigured

from llm_proxy.providers.base import Provider

if TYPE_CHECKING:
    from common.config import ProviderConfig

V1 = "v1"
_PATHS = {
    "chat": "/chat/completions",
    "responses": "/responses",
    "embeddings": "/embeddings",
}
# Deployment names come from what callers write: bound the parsed-URL cache.
_MAX_CACHED_URLS = 1024
# What operators paste as the endpoint besides the resource root.
_ENDPOINT_SUFFIXES = ("/openai/v1", "/openai")


class AzureProvider(Provider):
    kind = "azure"
    default_api_base = ""  # every resource has its own endpoint
    native_apis = frozenset(_PATHS)
    catalog_provider = "azure"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        where = f"providers.{config.name}"
        if not self.api_base:
            raise ImproperlyConfigured(
                f"{where}.api_base: the Azure resource's endpoint, "
                "e.g. https://my-resource.openai.azure.com"
            )
        for suffix in _ENDPOINT_SUFFIXES:
            self.api_base = self.api_base.removesuffix(suffix)
        options = config.options
        token = options.get("azure_ad_token") or ""
        if not isinstance(token, str):
            raise ImproperlyConfigured(f"{where}.azure_ad_token must be a string")
        if bool(self.api_key) == bool(token):
            raise ImproperlyConfigured(
                f"{where}: give exactly one of api_key (sent as api-key) and azure_ad_token "
                "(an Entra ID token, sent as Authorization: Bearer)"
            )
        self._auth = (
            {"api-key": self.api_key} if self.api_key else {"Authorization": f"Bearer {token}"}
        )
        version = options.get("api_version", V1)
        if not isinstance(version, str) or not version:
            raise ImproperlyConfigured(f"{where}.api_version must be 'v1' or a dated version")
        self.api_version = version
        deployments = options.get("deployments") or {}
        if not isinstance(deployments, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in deployments.items()
        ):
            raise ImproperlyConfigured(
                f"{where}.deployments must map model names to deployment names"
            )
        self.deployments: dict[str, str] = deployments
        self._deployment_urls: dict[tuple[str, str], httpx.URL] = {}
        if version == V1:
            self._base = f"{self.api_base}/openai/v1"
            self._query = ""
        else:
            self._base = f"{self.api_base}/openai"
            self._query = f"?api-version={quote(version, safe='')}"

    def deployment_url(self, api: str, deployment: str) -> httpx.URL:
        """The URL of `api` on `deployment`, parsed once (see Provider.url)."""
        key = (api, deployment)
        url = self._deployment_urls.get(key)
        if url is None:
            if len(self._deployment_urls) >= _MAX_CACHED_URLS:
                self._deployment_urls.clear()
            if self._query and api != "responses":
                text = f"{self._base}/deployments/{quote(deployment, safe='')}{_PATHS[api]}"
            else:
                text = f"{self._base}{_PATHS[api]}"
            url = self._deployment_urls[key] = httpx.URL(text + self._query)
        return url

    def headers(self, api: str) -> dict[str, str]:
        return self._auth

    def target(self, api: str, body: dict[str, Any]) -> tuple[httpx.URL, dict[str, Any]]:
        model = body.get("model")
        deployment = self.deployments.get(model, model) if isinstance(model, str) else ""
        # The v1 API and the Responses API find the deployment in `model`; deployment URLs
        # ignore it.
        return self.deployment_url(api, deployment), {**body, "model": deployment}
