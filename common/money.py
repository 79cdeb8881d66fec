"""The console's one rule for showing an amount of money (docs/ADMIN.md, "Money").

Display only: amounts are stored and computed exactly (Decimal, common.fields.MoneyField).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")


def format_usd(amount: Decimal | None) -> str:
    """The console's one rule for an amount of money: cents from a cent up (`$1,234.50`,
    `$0.30`), the micro-dollar below a cent so small amounts never read as $0.00
    (`$0.000021`), always with the currency. Display only: the stored value is exact, and
    `format_usd_exact` gives it to the micro-dollar where that matters."""
    if amount is None:
        return "—"
    amount = Decimal(amount)
    if amount == 0 or abs(amount) >= CENT:
        return _usd_text(amount.quantize(CENT, rounding=ROUND_HALF_UP), places=2)
    if abs(amount) < MICRO:
        return "< $0.000001" if amount > 0 else "> -$0.000001"
    return format_usd_exact(amount)


def format_usd_exact(amount: Decimal | None) -> str:
    """To the micro-dollar, trailing zeros beyond the cents dropped: `$0.06798`, `$3.50`."""
    if amount is None:
        return "—"
    return _usd_text(Decimal(amount).quantize(MICRO, rounding=ROUND_HALF_UP), places=6)


def _usd_text(rounded: Decimal, *, places: int) -> str:
    sign = "-" if rounded < 0 else ""
    whole, _, fraction = f"{abs(rounded):,.{places}f}".partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{fraction}"


def exact_str(amount: Decimal) -> str:
    """An amount as an exact decimal string without the column's trailing zeros (`0.5`),
    for machine-read text: webhook payloads and log lines."""
    return format(amount.normalize(), "f")


def format_price(amount: Decimal | None) -> str:
    """A per-million-token rate, to the ten places prices are stored with."""
    if amount is None:
        return "—"
    places = settings.MONEY_DECIMAL_PLACES
    return _usd_text(Decimal(amount).quantize(Decimal(1).scaleb(-places)), places=places)
