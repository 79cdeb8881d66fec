"""Provider instances by name, built once per process from common.config (§2, §9)."""

from __future__ import annotations

import functools

from common.config import gateway_config
from common.exceptions import BadRequest
from llm_proxy.providers.anthropic import AnthropicProvider
from llm_proxy.providers.azure import AzureProvider
from llm_proxy.providers.base import Provider
from llm_proxy.providers.bedrock import BedrockProvider
from llm_proxy.providers.gemini import GeminiProvider
from llm_proxy.providers.openai import OpenAIProvider
from llm_proxy.providers.vertex import VertexProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    OpenAIProvider.kind: OpenAIProvider,
    AnthropicProvider.kind: AnthropicProvider,
    AzureProvider.kind: AzureProvider,
    BedrockProvider.kind: BedrockProvider,
    GeminiProvider.kind: GeminiProvider,
    VertexProvider.kind: VertexProvider,
}


@functools.cache
def providers() -> dict[str, Provider]:
    return {
        name: PROVIDER_CLASSES[config.kind](config)
        for name, config in gateway_config().providers.items()
        if config.kind in PROVIDER_CLASSES
    }


def resolve_model(selector: str) -> tuple[Provider, str]:
    """Split `provider:model` or `provider/model` at the first separator.

    Model names may contain either character themselves (`ollama:llama3:8b`,
    `openrouter/meta-llama/llama-3-8b`), so only the first one is the provider's.
    """
    cut = min((i for i in (selector.find(":"), selector.find("/")) if i > 0), default=-1)
    if cut <= 0 or cut == len(selector) - 1:
        raise BadRequest(
            "model must be 'provider:model' (or 'provider/model'), e.g. 'openai:gpt-4o-mini'",
            code="invalid_model",
            param="model",
        )
    provider = providers().get(selector[:cut])
    if provider is None:
        raise BadRequest(
            "Unknown provider in model selector; configured providers: "
            + (", ".join(sorted(providers())) or "none"),
            code="unknown_provider",
            param="model",
        )
    return provider, selector[cut + 1 :]


__all__ = ["Provider", "providers", "resolve_model"]
