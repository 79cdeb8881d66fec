"""Reads of the usage app."""

from __future__ import annotations

from datetime import datetime

from usage.models import ModelPricing


def prices_current(now: datetime) -> list[ModelPricing]:
    """The price in effect now for every model that has one, by model key."""
    current: dict[str, ModelPricing] = {}
    for price in ModelPricing.objects.filter(effective_at__lte=now).order_by(
        "model_key", "-effective_at"
    ):
        current.setdefault(price.model_key, price)
    return list(current.values())
