"""Default prices from the `genai-prices` catalog (the package's bundled data, never fetched).

Which catalog provider prices a provider instance (the rule, written once here):

1. the instance's `catalog_provider:` in the config file, when given (`false`: none);
2. else the catalog provider whose API URL pattern matches the instance's `api_base`
   (`https://api.openai.com/v1` -> openai, `https://api.groq.com/openai/v1` -> groq, ...);
3. else the kind's own catalog provider, for kinds whose every endpoint sells one vendor's
   prices whatever its host (`azure` -> azure);
4. else none: a local or unknown server (Ollama, vLLM, a proxy) has no catalog price, and
   its models need an operator price (or `catalog_provider:` naming whose prices apply).

The model is matched by the catalog's own rules, which know dated snapshots and aliases
(`gpt-4o-2024-08-06` -> gpt-4o, `claude-3-5-sonnet-latest` -> claude-3-5-sonnet). A price
with tiers (more per token above a prompt size) is frozen at its base tier: the gateway's
price table is flat per model.

Lookups are cached per process: the catalog is consulted only for a model without a price
row, and the first use freezes its price into one (usage.services.pricing_freeze_catalog),
so a priced model never comes here again.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version

from usage.pricing import Rates

_PACKAGE = "genai-prices"


@dataclass(frozen=True, slots=True)
class CatalogPrice:
    rates: Rates
    # The catalog's id of the model the name matched (e.g. gpt-4o for gpt-4o-2024-08-06).
    catalog_model: str
    version: str


@functools.cache
def catalog_version() -> str:
    return version(_PACKAGE)


@functools.cache
def _snapshot():
    # Imported on first use: loading the catalog takes about a tenth of a second, which
    # a process that never needs it should not pay at start.
    from genai_prices import data_snapshot

    return data_snapshot.get_snapshot()


@functools.lru_cache(maxsize=1024)
def provider_for_url(api_base: str) -> str | None:
    """The catalog provider whose API URL pattern matches `api_base` (rule 2)."""
    for provider in _snapshot().providers:
        if re.match(provider.api_pattern, api_base):
            return provider.id
    return None


def catalog_provider_for(
    *, configured: str | None, api_base: str, kind_provider: str | None
) -> str | None:
    """The rule of the module docstring: whose catalog prices an instance's models."""
    if configured is not None:
        return configured or None
    return provider_for_url(api_base) or kind_provider


def _rate(value: object) -> Decimal | None:
    # A tiered price is frozen at its base tier (see the module docstring).
    value = getattr(value, "base", value)
    return value if isinstance(value, Decimal) else None


@functools.lru_cache(maxsize=4096)
def catalog_price(provider_id: str, model: str) -> CatalogPrice | None:
    """The catalog's per-token price of `model` at `provider_id`, or None when the catalog
    does not know it or does not price it by the token."""
    try:
        provider, info = _snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None
    prices = info.get_prices(datetime.now(tz=UTC))
    input_rate = _rate(prices.input_mtok)
    if input_rate is None:
        return None
    return CatalogPrice(
        rates=Rates(
            input_per_mtok=input_rate,
            # Embedding models have no output price: their output is free.
            output_per_mtok=_rate(prices.output_mtok) or Decimal(0),
            cache_read_per_mtok=_rate(prices.cache_read_mtok),
            cache_write_per_mtok=_rate(prices.cache_write_mtok),
        ),
        catalog_model=f"{provider.id}:{info.id}",
        version=catalog_version(),
    )
