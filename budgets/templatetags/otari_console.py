"""Template filters of the budget console: money, usage bars and states, formatted the
same way everywhere (the Python side uses the same functions)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django import template
from django.db.models import Max, Min
from django.utils import formats, timezone
from django.utils.safestring import SafeString
from django.utils.text import capfirst

from common import admin_tools

register = template.Library()


@register.filter
def usd(amount: Decimal | None) -> str:
    """`$1,234.50`; `$0.000021` (see common.admin_tools.format_usd)."""
    return admin_tools.format_usd(amount)


@register.filter
def usd_exact(amount: Decimal | None) -> str:
    """To the micro-dollar (see common.admin_tools.format_usd_exact)."""
    return admin_tools.format_usd_exact(amount)


@register.filter
def money(amount: Decimal | None) -> SafeString:
    """`usd`, with the exact amount on hover when rounded (common.admin_tools.money)."""
    return admin_tools.money(amount)


@register.filter
def usd_price(amount: Decimal | None) -> str:
    return admin_tools.format_price(amount)


@register.filter
def utc(moment: datetime | None) -> str:
    return admin_tools.as_utc(moment)


@register.filter
def usage_bar(user: Any) -> SafeString:
    """The usage bar of a user annotated by budgets.selectors.user_money_annotate."""
    return admin_tools.usage_bar(
        spend=user.spend_usd,
        reserved=user.reserved_usd,
        limit=user.cap_usd,
        refused_at=user.budget_refused_at,
    )


@register.filter
def status_badge(row: Any) -> SafeString:
    return admin_tools.status_badge(row.status, row.status_code)


@register.filter
def key_state(key: Any) -> SafeString:
    return admin_tools.key_state(key)


@register.filter
def key_display(key: Any) -> str:
    return admin_tools.key_display(key)


@register.filter
def thousands(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


@register.inclusion_tag("admin/date_hierarchy.html")
def otari_date_hierarchy(cl: Any) -> dict[str, Any]:
    """Django's date drill-down (years > months > days), built from the first and last
    dates of the filtered rows: one MIN/MAX query that an index on the date answers.

    Django's own tag lists the years or months that have rows with a SELECT DISTINCT
    over the whole filtered table, which reads every row of a million-row usage log. This
    one offers every year, month or day between the first and the last, so a bucket may
    occasionally be empty.
    """
    field = cl.date_hierarchy
    year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
    year, month, day = (cl.params.get(f) for f in (year_field, month_field, day_field))

    def link(filters: dict[str, Any]) -> str:
        return cl.get_query_string(filters, [f"{field}__"])

    if year and month and day:
        picked = date(int(year), int(month), int(day))
        return {
            "show": True,
            "back": {
                "link": link({year_field: year, month_field: month}),
                "title": capfirst(formats.date_format(picked, "YEAR_MONTH_FORMAT")),
            },
            "choices": [{"title": capfirst(formats.date_format(picked, "MONTH_DAY_FORMAT"))}],
        }
    bounds = cl.queryset.aggregate(first=Min(field), last=Max(field))
    if bounds["first"] is None:
        return {"show": True, "back": None, "choices": []}
    first, last = timezone.localtime(bounds["first"]), timezone.localtime(bounds["last"])
    if not year:
        if first.year != last.year:
            return {
                "show": True,
                "back": None,
                "choices": [
                    {"link": link({year_field: str(y)}), "title": str(y)}
                    for y in range(first.year, last.year + 1)
                ],
            }
        year = str(first.year)
        if first.month == last.month:
            month = str(first.month)
    if month:
        return {
            "show": True,
            "back": {"link": link({year_field: year}), "title": str(year)},
            "choices": [
                {
                    "link": link({year_field: year, month_field: month, day_field: d}),
                    "title": capfirst(
                        formats.date_format(date(int(year), int(month), d), "MONTH_DAY_FORMAT")
                    ),
                }
                for d in range(first.day, last.day + 1)
            ],
        }
    return {
        "show": True,
        "back": {"link": link({}), "title": "All dates"},
        "choices": [
            {
                "link": link({year_field: year, month_field: m}),
                "title": capfirst(formats.date_format(date(int(year), m, 1), "YEAR_MONTH_FORMAT")),
            }
            for m in range(first.month, last.month + 1)
        ],
    }
