"""The `openai` kind: OpenAI and every OpenAI-compatible server (vLLM, Ollama, OpenRouter,
Groq, Together, Gemini's OpenAI endpoint...)."""

from __future__ import annotations

from llm_proxy.providers.base import Provider

_PATHS = {
    "chat": "/chat/completions",
    "responses": "/responses",
    "embeddings": "/embeddings",
}


class OpenAIProvider(Provider):
    kind = "openai"
    default_api_base = "https://api.openai.com/v1"
    native_apis = frozenset(_PATHS)

    def path(self, api: str) -> str:
        return _PATHS[api]

    def headers(self, api: str) -> dict[str, str]:
        # Local servers (Ollama, llamafile) need no key; send none rather than "Bearer ".
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
