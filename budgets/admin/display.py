"""What the console's pages share: how a period, an amount, a link and a rate limit are shown,
and the form fields for a model list and metadata."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib.admin.utils import quote
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from budgets import rules
from budgets.models import (
    DEFAULT_WORKSPACE_ID,
    MAX_RPM_LIMIT,
    MAX_TPM_LIMIT,
    APIKey,
    Budget,
    Ceiling,
    GatewayUser,
    Organization,
    ResetAlignment,
    Workspace,
)
from common.admin_tools import (
    as_utc,
    badge,
    format_usd,
    key_display,
    usage_bar,
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


def muted(text: str) -> SafeString:
    return format_html('<span class="otari-muted">{}</span>', text)


# ---------------------------------------------------------------------------------------
# Temporary top-ups (users and ceilings): the same form rule and the same words


TOPUP_FIELDS = ("topup_usd", "topup_expires_at")


def topup_form_clean(form: forms.ModelForm, cleaned: dict[str, Any]) -> None:
    """A changed top-up needs an amount and an expiry in the future (0 and no expiry
    removes it); the errors go on the form's fields."""
    if not set(TOPUP_FIELDS) & set(form.changed_data):
        return
    amount = cleaned.get("topup_usd")
    expires_at = cleaned.get("topup_expires_at")
    if amount and expires_at is None:
        form.add_error("topup_expires_at", "Give the top-up an expiry time.")
    elif amount and expires_at <= timezone.now():
        form.add_error("topup_expires_at", "The expiry must be in the future.")
    elif expires_at is not None and not amount and "topup_usd" not in form.errors:
        form.add_error("topup_usd", "Enter the top-up amount, or clear the expiry.")


def topup_cell(amount: Decimal, expires_at: datetime | None) -> SafeString:
    """Whether a top-up raises the limit now: "active +$5.00 until …", "expired", "none"."""
    if not amount or expires_at is None:
        return muted("none")
    if not rules.topup_live(expires_at, timezone.now()):
        return format_html(
            '{} <span class="otari-muted">of {}, expired {}</span>',
            badge("muted", "expired"),
            format_usd(amount),
            as_utc(expires_at),
        )
    return format_html(
        "{} +{} until {}", badge("good", "active"), format_usd(amount), as_utc(expires_at)
    )


# ---------------------------------------------------------------------------------------
# Workspaces and ceilings


def workspace_of(key: APIKey) -> Any:
    """A key's workspace id: a key issued without one belongs to the default workspace."""
    return key.workspace_id or DEFAULT_WORKSPACE_ID


def workspace_keys(workspace_id: Any) -> Q:
    """The keys of a workspace (`workspace_of`, as a filter)."""
    keys = Q(workspace_id=workspace_id)
    if workspace_id == DEFAULT_WORKSPACE_ID:
        keys |= Q(workspace__isnull=True)
    return keys


def workspace_link(workspace_id: Any, label: str) -> SafeString:
    return format_html('<a href="{}">{}</a>', console_url(Workspace, "change", workspace_id), label)


def ceiling_limit(ceiling: Ceiling, now: datetime) -> Decimal | None:
    """What admission checks a ceiling against: its budget's limit plus a live top-up
    (budgets.rules, as for a user); None when the budget is uncapped."""
    return rules.limit_usd(
        ceiling.budget.max_budget_usd, ceiling.topup_usd, ceiling.topup_expires_at, now
    )


def ceiling_bar(ceiling: Ceiling, now: datetime) -> SafeString:
    """The user pages' bar: spend (solid) and reserved (hatched) of the limit."""
    return usage_bar(
        spend=ceiling.spend_usd,
        reserved=ceiling.reserved_usd,
        limit=ceiling_limit(ceiling, now),
    )


def provider_label(provider: str) -> str:
    return provider or "every provider"


def scope_labels(ceilings: Iterable[Ceiling]) -> dict[tuple[str, str], SafeString]:
    """What each ceiling caps, by name and linked: the organization, a workspace's name, a
    key (`gw-AbC…wxyz · ci`). Two queries whatever the number of ceilings; a scope whose
    row is gone reads as its id."""
    ids: dict[str, set[str]] = {}
    for ceiling in ceilings:
        ids.setdefault(ceiling.scope_type, set()).add(ceiling.scope_id)
    labels: dict[tuple[str, str], SafeString] = {}
    for scope_id in ids.get(Ceiling.Scope.ORGANIZATION, ()):
        labels[(Ceiling.Scope.ORGANIZATION, scope_id)] = format_html("{}", "the organization")
    wanted = ids.get(Ceiling.Scope.WORKSPACE)
    if wanted:
        for workspace in Workspace.objects.filter(pk__in=_uuids(wanted)).only("id", "name"):
            labels[(Ceiling.Scope.WORKSPACE, str(workspace.pk))] = workspace_link(
                workspace.pk, workspace.name
            )
    wanted = ids.get(Ceiling.Scope.API_TOKEN)
    if wanted:
        keys = APIKey.objects.filter(pk__in=_uuids(wanted)).only(
            "id", "key_prefix", "key_suffix", "key_name"
        )
        for key in keys:
            label = key_display(key) + (f" · {key.key_name}" if key.key_name else "")
            labels[(Ceiling.Scope.API_TOKEN, str(key.pk))] = format_html(
                '<a href="{}"><code>{}</code></a>', console_url(APIKey, "change", key.pk), label
            )
    return labels


def scope_label(labels: dict[tuple[str, str], SafeString], ceiling: Ceiling) -> SafeString:
    found = labels.get((ceiling.scope_type, ceiling.scope_id))
    return found if found is not None else format_html("<code>{}</code>", ceiling.scope_id)


def _uuids(texts: Iterable[str]) -> list[uuid.UUID]:
    out = []
    for text in texts:
        try:
            out.append(uuid.UUID(text))
        except ValueError:
            continue
    return out


def scope_choices() -> list[tuple[str, Any]]:
    """The scopes a ceiling can cap, for a select: the organization, every workspace,
    every active key (grouped), each as `scope_type:scope_id`."""
    organization = Organization.objects.order_by("created_at").first()
    choices: list[tuple[str, Any]] = [("", "---------")]
    if organization is not None:
        choices.append(
            (
                "Organization",
                [(scope_value(Ceiling.Scope.ORGANIZATION, organization.pk), "The organization")],
            )
        )
    choices.append(
        (
            "Workspaces",
            [
                (scope_value(Ceiling.Scope.WORKSPACE, pk), name)
                for pk, name in Workspace.objects.order_by("name").values_list("id", "name")
            ],
        )
    )
    keys = (
        APIKey.objects.filter(is_active=True)
        .order_by("user_id", "key_name", "created_at")
        .only("id", "key_prefix", "key_suffix", "key_name", "user_id")
    )
    choices.append(
        (
            "API keys",
            [
                (
                    scope_value(Ceiling.Scope.API_TOKEN, key.pk),
                    f"{key_display(key)} {key.key_name or ''} ({key.user_id})",
                )
                for key in keys
            ],
        )
    )
    return choices


def scope_value(scope_type: str, scope_id: Any) -> str:
    return f"{scope_type}:{scope_id}"


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
