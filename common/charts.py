"""Server-rendered SVG charts for the console: geometry here, markup in templates.

No JavaScript and nothing fetched: the dashboard works offline and prints. Coordinates
are floats (pixels); the amounts they stand for stay Decimal and are shown formatted.

The rows charted are described by the two Protocols below rather than imported from
usage.selectors (which returns them), so this package imports no app.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Protocol

from common.money import format_usd


class DaySpend(Protocol):
    """One day's totals (usage.selectors.DaySpend)."""

    day: date
    spend_usd: Decimal
    requests: int
    errors: int


class SpendShare(Protocol):
    """One row of a top-N spend table (usage.selectors.SpendShare)."""

    spend_usd: Decimal


_NICE_STEPS = (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10))


def nice_ceiling(value: Decimal) -> Decimal:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= value (axis maximum)."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for step in _NICE_STEPS:
        candidate = step.scaleb(exponent)
        if candidate >= value:
            return candidate
    return Decimal(10).scaleb(exponent)


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str
    today: bool
    errors: int


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    total_usd: Decimal
    summary: str

    @property
    def plot_height(self) -> float:
        return self.bottom - self.top

    @property
    def ylabel_x(self) -> float:
        return self.left - 6

    @property
    def xlabel_y(self) -> float:
        return self.height - 8


def _axis_label(amount: Decimal) -> str:
    return format_usd(amount)


def daily_spend_chart(
    days: Sequence[DaySpend], *, width: int = 1000, height: int = 250
) -> BarChart:
    """A column per day; the y axis runs from 0 to a round number above the busiest day."""
    left, right, top, bottom = 64.0, float(width - 8), 12.0, float(height - 28)
    plot_w, plot_h = right - left, bottom - top
    peak = max((d.spend_usd for d in days), default=Decimal(0))
    axis_max = nice_ceiling(peak)
    slot = plot_w / max(len(days), 1)
    gap = min(4.0, slot * 0.2)
    bars = []
    for i, d in enumerate(days):
        h = float(d.spend_usd / axis_max) * plot_h if d.spend_usd > 0 else 0.0
        # A day with traffic but a tiny spend still shows a sliver.
        if d.spend_usd > 0:
            h = max(h, 1.5)
        bars.append(
            Bar(
                x=round(left + i * slot + gap / 2, 2),
                y=round(bottom - h, 2),
                width=round(slot - gap, 2),
                height=round(h, 2),
                title=(
                    f"{d.day:%a %d %b}: {format_usd(d.spend_usd)} over "
                    f"{d.requests:,} request{'s' if d.requests != 1 else ''}"
                    + (f", {d.errors:,} failed" if d.errors else "")
                ),
                today=i == len(days) - 1,
                errors=d.errors,
            )
        )
    y_ticks = [
        Tick(position=round(bottom - plot_h * k / 4, 2), label=_axis_label(axis_max * k / 4))
        for k in range(5)
    ]
    x_ticks = [
        Tick(position=round(left + i * slot + slot / 2, 2), label=_day_label(d.day))
        for i, d in enumerate(days)
        if (len(days) - 1 - i) % 7 == 0
    ]
    total = sum((d.spend_usd for d in days), Decimal(0))
    return BarChart(
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        total_usd=total,
        summary=(
            f"Spend per day over the last {len(days)} days: {format_usd(total)} in "
            f"total, busiest day {format_usd(peak)}."
        ),
    )


def _day_label(day: date) -> str:
    return f"{day:%d %b}"


@dataclass(frozen=True, slots=True)
class ShareRow:
    share: SpendShare
    percent: float


def share_rows(shares: Sequence[SpendShare]) -> list[ShareRow]:
    """Horizontal bars: each row's width relative to the largest."""
    peak = max((s.spend_usd for s in shares), default=Decimal(0))
    return [
        ShareRow(share=s, percent=float(s.spend_usd * 100 / peak) if peak > 0 else 0.0)
        for s in shares
    ]
