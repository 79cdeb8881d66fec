"""The optional YAML file (`OTARI_CONFIG`): named provider instances and prices (§9).

```yaml
providers:
  openai:    {kind: openai, api_key: "${OPENAI_KEY}", timeout: 600}
  local:     {kind: openai, api_base: "http://127.0.0.1:11434/v1"}
  anthropic: {kind: anthropic, api_key: "${ANTHROPIC_KEY}"}
  vllm:      {kind: openai, api_base: "http://127.0.0.1:8000/v1", apis: [chat, embeddings]}
  bedrock:   {kind: bedrock, region: us-east-1}          # AWS credential chain
  gemini:    {kind: gemini, api_key: "${GEMINI_API_KEY}"}
  vertex:    {kind: vertex, project: my-project, location: us-central1}  # ADC
pricing:
  "openai:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60,
                         cache_read_price_per_million: 0.075}
```

`${VAR}` in a string is replaced by that environment variable, so secrets can stay out of
the file. The environment shortcuts OPENAI_API_KEY/OPENAI_API_BASE and
ANTHROPIC_API_KEY/ANTHROPIC_API_BASE define the `openai` and `anthropic` instances unless
the file defines instances of those names itself.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PROVIDER_KINDS = ("openai", "anthropic", "azure", "bedrock", "gemini", "vertex")
# The keys every kind reads; any other key of a provider's mapping is kind-specific and
# goes to `ProviderConfig.options`, for that kind's provider class to read and check.
_COMMON_KEYS = frozenset({"kind", "api_key", "api_base", "timeout", "apis", "catalog_provider"})
# Kind-specific options whose values are secrets (never logged): e.g. azure_ad_token.
_SECRET_OPTION = re.compile(r"(?:^|_)(?:key|token|secret|password)$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str
    api_key: str = ""
    api_base: str = ""
    # Seconds the upstream may take: to the first byte, and between stream chunks.
    timeout_s: float = 600.0
    # The client APIs the instance serves natively (None: all its kind speaks); the
    # others are translated (docs/TRANSLATION.md).
    apis: tuple[str, ...] | None = None
    # Whose catalog prices apply to the instance's models (usage.catalog): None = derived
    # from api_base and kind; "" = none.
    catalog_provider: str | None = None
    # The kind's own settings (e.g. azure: api_version, deployments, azure_ad_token),
    # `${VAR}` expanded; the provider class validates them.
    options: dict[str, Any] = field(default_factory=dict)

    def secret_values(self) -> list[str]:
        """The credentials this instance holds, for log redaction."""
        values = [self.api_key]
        values += [v for k, v in self.options.items() if _SECRET_OPTION.search(k)]
        return [value for value in values if isinstance(value, str) and value]


@dataclass(frozen=True)
class PriceConfig:
    model_key: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None


@dataclass(frozen=True)
class GatewayConfig:
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    pricing: dict[str, PriceConfig] = field(default_factory=dict)
    # Routing (docs/ROUTING.md), as written: `aliases: {name: provider:model}` and
    # `routing: {policies: {name: spec}}`. Validated by llm_proxy.routing at startup
    # (common/ imports no app, and the rules are routing's).
    aliases: dict[str, Any] = field(default_factory=dict)
    routing_policies: dict[str, Any] = field(default_factory=dict)


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value)
    if isinstance(value, dict):
        return {key: _expand(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item) for item in value]
    return value


def _money(raw: Any, where: str) -> Decimal:
    # YAML numbers arrive as float: go through their shortest text form, never the
    # float's binary value (0.15 -> Decimal("0.15"), not 0.1499999...).
    try:
        value = Decimal(str(raw))
    except (InvalidOperation, ValueError) as exc:
        raise ImproperlyConfigured(f"{where}: not a number") from exc
    if value < 0 or not value.is_finite():
        raise ImproperlyConfigured(f"{where}: must be a non-negative number")
    return value


def _parse_provider(name: str, raw: Any) -> ProviderConfig:
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(f"providers.{name}: expected a mapping")
    kind = raw.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise ImproperlyConfigured(f"providers.{name}.kind must be one of {PROVIDER_KINDS}")
    timeout = raw.get("timeout", settings.OTARI_PROVIDER_TIMEOUT_SECONDS)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ImproperlyConfigured(f"providers.{name}.timeout must be a positive number")
    apis = raw.get("apis")
    if apis is not None and (
        not isinstance(apis, list) or not all(isinstance(api, str) for api in apis)
    ):
        raise ImproperlyConfigured(f"providers.{name}.apis must be a list of API names")
    catalog_provider = raw.get("catalog_provider")
    if catalog_provider is False:
        catalog_provider = ""
    if catalog_provider is not None and not isinstance(catalog_provider, str):
        raise ImproperlyConfigured(
            f"providers.{name}.catalog_provider must be a catalog provider id or false"
        )
    return ProviderConfig(
        name=name,
        kind=kind,
        api_key=_expand(raw.get("api_key") or ""),
        api_base=_expand(raw.get("api_base") or ""),
        timeout_s=float(timeout),
        apis=tuple(apis) if apis is not None else None,
        catalog_provider=catalog_provider,
        options={str(key): _expand(value) for key, value in raw.items() if key not in _COMMON_KEYS},
    )


def _parse_price(model_key: str, raw: Any) -> PriceConfig:
    where = f"pricing.{model_key}"
    if not isinstance(raw, dict) or ":" not in model_key:
        raise ImproperlyConfigured(f"{where}: expected 'provider:model' -> rates")

    def optional(name: str) -> Decimal | None:
        value = raw.get(name)
        return None if value is None else _money(value, f"{where}.{name}")

    return PriceConfig(
        model_key=model_key,
        input_per_mtok=_money(raw.get("input_price_per_million", 0), f"{where}.input"),
        output_per_mtok=_money(raw.get("output_price_per_million", 0), f"{where}.output"),
        cache_read_per_mtok=optional("cache_read_price_per_million"),
        cache_write_per_mtok=optional("cache_write_price_per_million"),
    )


@functools.cache
def gateway_config() -> GatewayConfig:
    """The parsed configuration; read once per process."""
    raw: dict[str, Any] = {}
    if settings.OTARI_CONFIG:
        path = Path(settings.OTARI_CONFIG)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ImproperlyConfigured(f"OTARI_CONFIG: cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ImproperlyConfigured("OTARI_CONFIG: expected a mapping at the top level")
    providers = {
        name: _parse_provider(str(name), value)
        for name, value in (raw.get("providers") or {}).items()
    }
    shortcuts = {
        "openai": (settings.OPENAI_API_KEY, settings.OPENAI_API_BASE),
        "anthropic": (settings.ANTHROPIC_API_KEY, settings.ANTHROPIC_API_BASE),
    }
    for kind, (api_key, api_base) in shortcuts.items():
        if (api_key or api_base) and kind not in providers:
            providers[kind] = ProviderConfig(
                name=kind,
                kind=kind,
                api_key=api_key,
                api_base=api_base,
                timeout_s=settings.OTARI_PROVIDER_TIMEOUT_SECONDS,
            )
    pricing = {
        str(key): _parse_price(str(key), value) for key, value in (raw.get("pricing") or {}).items()
    }
    aliases = raw.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise ImproperlyConfigured("aliases: expected a mapping of name -> provider:model")
    routing = raw.get("routing") or {}
    if not isinstance(routing, dict) or set(routing) - {"policies"}:
        raise ImproperlyConfigured("routing: expected a mapping with `policies`")
    policies = routing.get("policies") or {}
    if not isinstance(policies, dict):
        raise ImproperlyConfigured("routing.policies: expected a mapping of name -> spec")
    return GatewayConfig(
        providers=providers,
        pricing=pricing,
        aliases={str(name): target for name, target in aliases.items()},
        routing_policies={str(name): spec for name, spec in policies.items()},
    )
