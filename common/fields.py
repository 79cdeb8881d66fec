"""Model fields shared by the apps."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models


class MoneyField(models.DecimalField):
    """A USD amount: Decimal, with the project's one definition of digits and places.

    Twelve integer digits and ten places (settings.MONEY_*): balances and costs are exact
    to the micro-dollar and per-million prices to 1e-10 (docs/SPEC.md §3.1).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_digits", settings.MONEY_MAX_DIGITS)
        kwargs.setdefault("decimal_places", settings.MONEY_DECIMAL_PLACES)
        if not kwargs.get("null"):
            kwargs.setdefault("default", Decimal("0"))
        super().__init__(*args, **kwargs)
