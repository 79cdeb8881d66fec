"""The `openai` kind: OpenAI and every OpenAI-compatible server (vLLM, Ollama, OpenRouter,
Groq, Together, Mistral, DeepSeek, LM Studio...; docs/PROVIDERS.md has a tested example
of each).

Kind-specific option: `stream_options: false` for servers that reject the field (Mistral
answers 422): the gateway then does not ask for the usage chunk it otherwise adds to chat
streams, and such servers send their usage in the last chunk of their own accord.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

from llm_proxy.providers.base import Provider

if TYPE_CHECKING:
    import httpx

    from common.config import ProviderConfig

_PATHS = {
    "chat": "/chat/completions",
    "responses": "/responses",
    "embeddings": "/embeddings",
}


class OpenAIProvider(Provider):
    kind = "openai"
    default_api_base = "https://api.openai.com/v1"
    native_apis = frozenset(_PATHS)

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        stream_options = config.options.get("stream_options", True)
        if not isinstance(stream_options, bool):
            raise ImproperlyConfigured(f"providers.{config.name}.stream_options must be a boolean")
        self._strip_stream_options = not stream_options

    def path(self, api: str) -> str:
        return _PATHS[api]

    def headers(self, api: str) -> dict[str, str]:
        # Local servers (Ollama, llamafile) need no key; send none rather than "Bearer ".
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def target(self, api: str, body: dict[str, Any]) -> tuple[httpx.URL, dict[str, Any]]:
        if self._strip_stream_options and "stream_options" in body:
            body = {key: value for key, value in body.items() if key != "stream_options"}
        return self.url(api), body
