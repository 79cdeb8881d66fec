"""The price a local request is held and charged at: the operator's, else the catalog's.

An operator price (config file, API, console) always wins: it is a price row, which the
caller's load already read. Only a model without one comes here, and when the catalog
(usage.catalog) knows it, its price is frozen into a price row on this first use, so the
next request finds that row with the caller and never consults the catalog again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings

from usage import catalog, services
from usage.models import ModelPricing

if TYPE_CHECKING:
    from datetime import datetime

    from budgets.selectors import Caller
    from llm_proxy.providers.base import Provider
    from usage.pricing import Rates


def _catalog_rates(*, provider_id: str, model: str, model_key: str, now: datetime) -> Rates | None:
    price = catalog.catalog_price(provider_id, model)
    if price is None:
        return None
    return services.pricing_freeze_catalog(model_key=model_key, price=price, now=now).rates


async def rates_for(
    *, caller: Caller, provider: Provider, model: str, model_key: str, now: datetime
) -> Rates | None:
    """The model's current price; None when neither the operator nor the catalog has one."""
    if not settings.OTARI_PRICE_CATALOG:
        # The catalog is off: its frozen defaults no longer count either.
        return None if caller.price_origin == ModelPricing.Origin.CATALOG else caller.rates
    if caller.rates is not None:
        return caller.rates
    provider_id = provider.catalog_provider_id()
    if provider_id is None:
        return None
    # In a thread: the first lookup loads the catalog, and the first use writes a row.
    return await sync_to_async(_catalog_rates)(
        provider_id=provider_id, model=model, model_key=model_key, now=now
    )
