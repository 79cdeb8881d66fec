"""Writes of the usage app: price versions."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from budgets.selectors import price_at
from otari.config import PriceConfig, gateway_config
from usage.models import ModelPricing


def pricing_set(
    *,
    model_key: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cache_read_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    effective_at: datetime | None = None,
    origin: str = ModelPricing.Origin.API,
) -> ModelPricing:
    """Add a price version for `model_key`, in effect from `effective_at` (default now).

    A version at exactly the same instant is replaced, so setting a price twice is safe.
    """
    effective_at = effective_at or timezone.now()
    with transaction.atomic(durable=True):
        price, _ = ModelPricing.objects.update_or_create(
            model_key=model_key,
            effective_at=effective_at,
            defaults={
                "input_price_per_mtok_usd": input_per_mtok,
                "output_price_per_mtok_usd": output_per_mtok,
                "cache_read_price_per_mtok_usd": cache_read_per_mtok,
                "cache_write_price_per_mtok_usd": cache_write_per_mtok,
                "origin": origin,
            },
        )
        return price


def pricing_delete(*, model_key: str, effective_at: datetime | None = None) -> int:
    """Delete one price version (`effective_at`) or every version of a model; returns
    how many rows went. Usage rows keep their cost: it was computed when they settled."""
    with transaction.atomic(durable=True):
        versions = ModelPricing.objects.filter(model_key=model_key)
        if effective_at is not None:
            versions = versions.filter(effective_at=effective_at)
        deleted, _ = versions.delete()
        return deleted


def _differs(price: ModelPricing | None, config: PriceConfig) -> bool:
    if price is None:
        return True
    return (
        price.input_price_per_mtok_usd != config.input_per_mtok
        or price.output_price_per_mtok_usd != config.output_per_mtok
        or price.cache_read_price_per_mtok_usd != config.cache_read_per_mtok
        or price.cache_write_price_per_mtok_usd != config.cache_write_per_mtok
    )


def pricing_sync_from_config(*, now: datetime | None = None) -> list[ModelPricing]:
    """Make the YAML file's `pricing:` the current price of each model it names.

    Adds a version only where the current price differs, so restarts add nothing and
    history stays readable; prices set through the API or admin since are overridden only
    when the file itself changes them.
    """
    now = now or timezone.now()
    added = []
    for model_key, config in gateway_config().pricing.items():
        if _differs(price_at(model_key, now), config):
            added.append(
                pricing_set(
                    model_key=model_key,
                    input_per_mtok=config.input_per_mtok,
                    output_per_mtok=config.output_per_mtok,
                    cache_read_per_mtok=config.cache_read_per_mtok,
                    cache_write_per_mtok=config.cache_write_per_mtok,
                    effective_at=now,
                    origin=ModelPricing.Origin.CONFIG,
                )
            )
    return added
