"""The `gemini` kind: Google's Gemini API on AI Studio (generateContent), with an API key.

```yaml
providers:
  gemini: {kind: gemini, api_key: "${GEMINI_API_KEY}"}
```

Requests go to `{api_base}/models/{model}:generateContent`, or, streamed,
`:streamGenerateContent?alt=sse` (server-sent events); `api_base` defaults to
`https://generativelanguage.googleapis.com/v1beta`. The key travels in the
`x-goog-api-key` header, never in the URL (URLs end up in logs). Every client API is
translated to generateContent (translate.gemini). The vertex kind speaks the same wire
format with OAuth credentials (providers.vertex).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from llm_proxy.errors import ProviderCredentialsRejected
from llm_proxy.providers.base import Provider
from llm_proxy.translate.gemini import API

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llm_proxy.errors import ProviderError


_DURATION = re.compile(r"^(\d+)(?:\.\d+)?s$")


class GoogleProvider(Provider):
    """What the gemini and vertex kinds share: the generateContent wire format."""

    native_apis = frozenset({API})
    options = frozenset()

    model_in_url = True

    def method_url(self, prefix: str, model: str, *, stream: bool) -> str:
        # Model names are one path segment; `:` before the method is the API's syntax.
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{prefix}/models/{quote(model, safe='')}:{method}"

    def signed_headers(
        self, credentials: dict[str, str], url: str, content: bytes
    ) -> dict[str, str]:
        """`credentials`: the headers that authenticate a request (an API key's, or an
        OAuth token's)."""
        return {"Content-Type": "application/json", **credentials}

    def retry_after(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """Google sends no Retry-After header on a 429; its error's RetryInfo detail
        says how long to wait (`"retryDelay": "34s"`)."""
        header = headers.get("retry-after")
        if header:
            return header
        try:
            details = json.loads(body)["error"]["details"]
        except (ValueError, KeyError, TypeError):
            return None
        for detail in details if isinstance(details, list) else ():
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            match = _DURATION.match(delay) if isinstance(delay, str) else None
            if match:
                # Rounded up: retrying a fraction of a second early fails again.
                return str(int(match.group(1)) + (1 if "." in delay else 0))
        return None


class GeminiProvider(GoogleProvider):
    """See the module docstring."""

    kind = "gemini"
    default_api_base = "https://generativelanguage.googleapis.com/v1beta"

    def model_url(self, model: str, *, stream: bool) -> str:
        return self.method_url(self.api_base, model, stream=stream)

    async def credentials(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    def upstream_error(
        self, status: int, headers: Mapping[str, str], body: bytes, *, echoes: list[str]
    ) -> ProviderError:
        # AI Studio answers a bad or revoked key with 400 INVALID_ARGUMENT: the gateway's
        # credentials, not the caller's request, are wrong.
        if status == 400 and b"API_KEY_INVALID" in body:
            return ProviderCredentialsRejected()
        return super().upstream_error(status, headers, body, echoes=echoes)
