"""What the console's pages share: how a period, an amount, a link and a rate limit are shown,
and the form fields for a model list and metadata."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from budgets.models import (
    MAX_RPM_LIMIT,
    MAX_TPM_LIMIT,
    APIKey,
    Budget,
    GatewayUser,
    ResetAlignment,
)
from common.admin_tools import (
    format_usd,
)

# How many users a budget's page lists (fullest first); the rest are one click away.
BUDGET_USERS_SHOWN = 50
USER_KEYS_SHOWN = 20
USER_RECENT_USAGE_SHOWN = 10
USER_CHART_DAYS = 30


# ---------------------------------------------------------------------------------------
# Small display helpers


def describe_period(budget: Budget | None) -> str:
    if budget is None:
        return "—"
    if budget.budget_duration_sec:
        return "Every " + _humanize_seconds(budget.budget_duration_sec)
    if budget.reset_alignment:
        return {
            ResetAlignment.CALENDAR_DAY: "Daily, at 00:00 UTC",
            ResetAlignment.CALENDAR_WEEK: "Weekly, Mondays 00:00 UTC",
            ResetAlignment.CALENDAR_MONTH: "Monthly, on the 1st (UTC)",
        }.get(budget.reset_alignment, budget.reset_alignment)
    return "Never resets"


def _humanize_seconds(seconds: int) -> str:
    for unit_seconds, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds % unit_seconds == 0:
            count = seconds // unit_seconds
            return f"{count:,} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:,} seconds"


def console_url(model: type, action: str, *args: Any, query: dict[str, str] | None = None) -> str:
    opts = model._meta
    url = reverse(
        f"admin:{opts.app_label}_{opts.model_name}_{action}", args=[quote(a) for a in args]
    )
    return f"{url}?{urlencode(query)}" if query else url


def user_link(user_id: str, label: str | None = None) -> SafeString:
    return format_html(
        '<a href="{}">{}</a>', console_url(GatewayUser, "change", user_id), label or user_id
    )


def money_cell(amount: Decimal | None) -> SafeString:
    return format_html('<span class="otari-money">{}</span>', format_usd(amount))


# ---------------------------------------------------------------------------------------
# Users


def model_list_value(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise forms.ValidationError(
            'Enter a JSON list of model names, such as ["openai:gpt-4o-mini"].'
        )
    return value


def metadata_field_value(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise forms.ValidationError('Enter a JSON object, such as {"team": "research"}.')
    return value


# ---------------------------------------------------------------------------------------
# Rate limits (users and keys): the same rule as budgets.services and the API


class RateLimitField(forms.IntegerField):
    """A whole number from 1 to `maximum`, or empty for no limit."""

    def __init__(self, *, maximum: int, **kwargs: Any) -> None:
        message = f"Enter a whole number from 1 to {maximum:,}, or leave it empty for no limit."
        super().__init__(
            required=False,
            min_value=1,
            max_value=maximum,
            error_messages={"invalid": message, "min_value": message, "max_value": message},
            widget=forms.NumberInput(attrs={"min": 1, "max": maximum, "step": 1}),
            **kwargs,
        )


def rpm_limit_field(help_text: str) -> RateLimitField:
    return RateLimitField(maximum=MAX_RPM_LIMIT, label="Requests per minute", help_text=help_text)


def tpm_limit_field(help_text: str) -> RateLimitField:
    return RateLimitField(maximum=MAX_TPM_LIMIT, label="Tokens per minute", help_text=help_text)


RATE_LIMITS_DESCRIPTION = (
    "Over a limit, requests are refused with 429 and Retry-After until the minute's window "
    "ends. Empty = no limit. Applies from the next request, in every gateway process."
)


def limits_cell(obj: GatewayUser | APIKey) -> SafeString:
    """`60 rpm · 100,000 tpm`, or a muted dash for no limits."""
    parts = [
        f"{value:,} {unit}"
        for value, unit in ((obj.rpm_limit, "rpm"), (obj.tpm_limit, "tpm"))
        if value is not None
    ]
    if not parts:
        return format_html('<span class="otari-muted">{}</span>', "—")
    return format_html(
        '<span title="{}">{}</span>', "Requests / tokens per minute", " · ".join(parts)
    )
