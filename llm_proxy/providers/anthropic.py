"""The `anthropic` kind: Anthropic's Messages API (and servers that copy it).

`api_base` is the server's root, as the Anthropic SDK's `base_url` is:
`https://api.anthropic.com` (the default), and requests go to `{api_base}/v1/messages`.
A base that already ends in `/v1` (as OpenAI-style bases do) is accepted too: requests
then go to `{api_base}/messages`, so either spelling of the same server works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_proxy.providers.base import Provider

if TYPE_CHECKING:
    from collections.abc import Mapping

# The API version the gateway's translations are written against; a native request may
# ask for another with its own anthropic-version header.
ANTHROPIC_VERSION = "2023-06-01"
# Client headers passed on to the provider on a native /v1/messages request: the API
# version and opt-in beta features change what the request means.
_FORWARDED = ("anthropic-version", "anthropic-beta")


class AnthropicProvider(Provider):
    kind = "anthropic"
    default_api_base = "https://api.anthropic.com"
    native_apis = frozenset({"messages"})

    def path(self, api: str) -> str:
        prefix = "" if self.api_base.endswith("/v1") else "/v1"
        return f"{prefix}/messages"

    def headers(self, api: str) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def forwarded_headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        return {name: client_headers[name] for name in _FORWARDED if client_headers.get(name)}
