"""The budget console: budgets, users, API keys, holds and reset logs (docs/SPEC.md §8).

Every change of money-related state goes through budgets.services, the same functions
the API and the commands call: the forms validate, then save_model/delete_model and the
actions call a service. Spend, reserved and lifetime spend are never editable; holds,
reset logs and budget alerts are history, read-only for everyone. Secrets are shown once
and never stored.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import ShowFacets
from django.contrib.admin.utils import quote
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from budgets import (
    admin_pricing,  # noqa: F401 - registers the price page
    alerting,
    rules,
)
from budgets.admin_history import SettingHistoryMixin
from budgets.models import (
    MAX_RPM_LIMIT,
    MAX_TPM_LIMIT,
    APIKey,
    Budget,
    BudgetAlert,
    BudgetResetLog,
    GatewayUser,
    Hold,
    ResetAlignment,
)
from budgets.selectors import user_money_annotate
from budgets.services import accounts, holds, keys, periods
from common.admin_tools import (
    ZERO,
    CsvExportMixin,
    EstimatedCountPaginator,
    LedgerAdmin,
    ServiceAdmin,
    UserIdFilter,
    as_utc,
    badge,
    format_usd,
    key_display,
    key_state,
    usage_bar,
)
from common.charts import daily_spend_chart
from common.exceptions import Conflict
from usage.selectors import spend_by_day

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


def _admin_url(model: type, action: str, *args: Any, query: dict[str, str] | None = None) -> str:
    opts = model._meta
    url = reverse(
        f"admin:{opts.app_label}_{opts.model_name}_{action}", args=[quote(a) for a in args]
    )
    return f"{url}?{urlencode(query)}" if query else url


def user_link(user_id: str, label: str | None = None) -> SafeString:
    return format_html(
        '<a href="{}">{}</a>', _admin_url(GatewayUser, "change", user_id), label or user_id
    )


def _money_cell(amount: Decimal | None) -> SafeString:
    return format_html('<span class="otari-money">{}</span>', format_usd(amount))


# ---------------------------------------------------------------------------------------
# Budgets

# Commas, semicolons, spaces or one entry per line.
_LIST_SEPARATORS = re.compile(r"[\s,;]+")


def _by_service_rule(rule: Callable[[Any], Any], value: Any) -> Any:
    """`value` through one of budgets.alerting's rules, the ones budget_create and
    budget_update apply: the console refuses exactly what the API refuses, with the
    rule's own message (which never repeats the value)."""
    try:
        return rule(value)
    except forms.ValidationError as exc:
        raise forms.ValidationError([m[:1].upper() + m[1:] for m in exc.messages]) from None


class AlertThresholdsField(forms.CharField):
    """Percents typed as `80, 100`, cleaned to the sorted list the service stores."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[int]:
        parts = [p for p in _LIST_SEPARATORS.split(super().to_python(value)) if p]
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise forms.ValidationError(
                "Enter whole percentages separated by commas, such as 80, 100."
            )
        return [int(p) for p in parts]

    def clean(self, value: Any) -> list[int]:
        return _by_service_rule(alerting.clean_thresholds, super().clean(value))


class AlertEmailsField(forms.CharField):
    """Addresses separated by commas or one per line."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 60})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return "\n".join(value)
        return value

    def to_python(self, value: Any) -> list[str]:
        return [p for p in _LIST_SEPARATORS.split(super().to_python(value)) if p]

    def clean(self, value: Any) -> list[str]:
        return _by_service_rule(alerting.clean_emails, super().clean(value))


class AlertWebhookField(forms.CharField):
    def clean(self, value: Any) -> str:
        return _by_service_rule(alerting.clean_webhook_url, super().clean(value))


# Form fields of their own rather than the model's (the lists are easier to type as text
# than as JSON), validated by the service's rules only (see BudgetForm).
ALERT_FIELDS = ("alert_thresholds_pct", "alert_webhook_url", "alert_emails")


class BudgetForm(forms.ModelForm):
    alert_thresholds_pct = AlertThresholdsField(
        label="Alert at (% of the limit)",
        required=False,
        help_text="Whole percents, such as 80, 100: each alerts once per user and period. "
        "Empty = no alerts.",
    )
    alert_webhook_url = AlertWebhookField(
        label="Alert webhook URL",
        required=False,
        max_length=2000,
        widget=forms.URLInput(attrs={"size": 60}),
        help_text="An http(s) URL that receives each alert as a JSON POST.",
    )
    alert_emails = AlertEmailsField(
        label="Alert email addresses",
        required=False,
        help_text=f"Up to {alerting.MAX_EMAILS}, separated by commas or one per line.",
    )

    class Meta:
        model = Budget
        fields = ["name", "max_budget_usd", "budget_duration_sec", "reset_alignment"]
        labels = {
            "max_budget_usd": "Limit (USD per period)",
            "budget_duration_sec": "Rolling period (seconds)",
            "reset_alignment": "Calendar period",
        }
        help_texts = {
            "max_budget_usd": "Each user on this budget may spend this much per period. "
            "Leave empty for no limit (spend is still tracked).",
            "budget_duration_sec": "A window of this many seconds, starting when a user is "
            "put on the budget: 86400 = 1 day, 604800 = 7 days, 2592000 = 30 days.",
            "reset_alignment": "Or reset on UTC calendar boundaries. Leave both empty for "
            "a budget that never resets.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ALERT_FIELDS:
            # The budget's settings (the model's defaults on the add page).
            self.initial.setdefault(name, getattr(self.instance, name))
        # Absent on the read-only page of staff who may only view budgets.
        if "budget_duration_sec" in self.fields:
            duration = self.fields["budget_duration_sec"]
            duration.widget.attrs["min"] = 1
            duration.validators.append(_positive_seconds)

    def _get_validation_exclusions(self) -> set[str]:
        # The alert settings are checked by the service's rules above, as in the API.
        # The model's URLField validator would also refuse URLs the API accepts, such
        # as `http://receiver:8080/` (a host without a dot, e.g. a container's name).
        return super()._get_validation_exclusions() | set(ALERT_FIELDS)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("budget_duration_sec") and cleaned.get("reset_alignment"):
            message = "Choose a rolling period or a calendar period, not both."
            self.add_error("budget_duration_sec", message)
            self.add_error("reset_alignment", message)
        return cleaned


def _positive_seconds(value: int | None) -> None:
    if value is not None and value < 1:
        raise forms.ValidationError("The period must be at least one second.")


class PeriodKindFilter(admin.SimpleListFilter):
    title = "period"
    parameter_name = "period"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("rolling", "Rolling"), ("calendar", "Calendar"), ("none", "Never resets")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "rolling":
            return queryset.filter(budget_duration_sec__isnull=False)
        if self.value() == "calendar":
            return queryset.filter(reset_alignment__isnull=False)
        if self.value() == "none":
            return queryset.filter(budget_duration_sec__isnull=True, reset_alignment__isnull=True)
        return queryset


@admin.register(Budget)
class BudgetAdmin(SettingHistoryMixin, ServiceAdmin):
    form = BudgetForm
    list_display = [
        "display_name",
        "limit",
        "period",
        "user_count",
        "total_spend",
        "total_reserved",
        "created_at",
    ]
    list_filter = [PeriodKindFilter]
    search_fields = ["name", "budget_id"]
    readonly_fields = [
        "budget_id",
        "created_at",
        "updated_at",
        "users_table",
        "alerts_link",
        "alert_thresholds",
        "alert_webhook",
        "alert_recipients",
    ]

    def get_fieldsets(self, request: HttpRequest, obj: Budget | None = None) -> list:
        alert_fields = list(ALERT_FIELDS)
        if obj is not None and not self.has_change_permission(request, obj):
            # Staff who may only look: the settings in words, and the webhook without
            # its path (which may carry a token).
            alert_fields = ["alert_thresholds", "alert_webhook", "alert_recipients"]
        if obj is not None and request.user.has_perm("budgets.view_budgetalert"):
            alert_fields.append("alerts_link")
        fieldsets: list = [
            (None, {"fields": ["name", "max_budget_usd"]}),
            (
                "Period",
                {
                    "fields": ["budget_duration_sec", "reset_alignment"],
                    "description": "Changing the period re-times each user's current "
                    "window from its start; spend so far is kept.",
                },
            ),
            (
                "Alerts",
                {
                    "fields": alert_fields,
                    "description": "Tell someone when a user's spend reaches these "
                    "percentages of their limit (the budget's limit plus any top-up). "
                    "Needs a webhook or an email address; without either, nothing is sent.",
                },
            ),
        ]
        if obj is not None:
            fieldsets += [
                ("Users on this budget", {"fields": ["users_table"]}),
                ("Record", {"fields": ["budget_id", "created_at", "updated_at"]}),
            ]
        return fieldsets

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        live = Q(users__deleted_at__isnull=True)
        return (
            super()
            .get_queryset(request)
            .annotate(
                user_count=Count("users", filter=live),
                total_spend=Coalesce(Sum("users__spend_usd", filter=live), ZERO),
                total_reserved=Coalesce(Sum("users__reserved_usd", filter=live), ZERO),
            )
        )

    @admin.display(description="Budget", ordering="name")
    def display_name(self, obj: Budget) -> str:
        return str(obj)

    @admin.display(description="Limit per period", ordering="max_budget_usd")
    def limit(self, obj: Budget) -> SafeString:
        if obj.max_budget_usd is None:
            return format_html('<span class="otari-muted">{}</span>', "uncapped")
        return _money_cell(obj.max_budget_usd)

    @admin.display(description="Period")
    def period(self, obj: Budget) -> str:
        return describe_period(obj)

    @admin.display(description="Users", ordering="user_count")
    def user_count(self, obj: Budget) -> SafeString:
        return format_html(
            '<a href="{}">{}</a>',
            _admin_url(GatewayUser, "changelist", query={"budget__budget_id__exact": obj.pk}),
            f"{obj.user_count:,}",
        )

    @admin.display(description="Spend this period (all users)", ordering="total_spend")
    def total_spend(self, obj: Budget) -> SafeString:
        return _money_cell(obj.total_spend)

    @admin.display(description="Reserved now", ordering="total_reserved")
    def total_reserved(self, obj: Budget) -> SafeString:
        return _money_cell(obj.total_reserved)

    @admin.display(description="Users")
    def users_table(self, obj: Budget) -> SafeString:
        users = user_money_annotate(
            GatewayUser.objects.filter(budget=obj, deleted_at__isnull=True).select_related(
                "budget"
            ),
            now=timezone.now(),
        ).order_by("-used_ratio", "-spend_usd", "user_id")[:BUDGET_USERS_SHOWN]
        return render_to_string(
            "admin/budgets/budget/users_table.html",
            {
                "budget": obj,
                "users": list(users),
                "all_url": _admin_url(
                    GatewayUser, "changelist", query={"budget__budget_id__exact": obj.pk}
                ),
                "add_url": _admin_url(GatewayUser, "add", query={"budget": obj.pk}),
            },
        )

    @admin.display(description="Alert at")
    def alert_thresholds(self, obj: Budget) -> str:
        return ", ".join(f"{t}%" for t in obj.alert_thresholds_pct) or "never"

    @admin.display(description="Alert webhook")
    def alert_webhook(self, obj: Budget) -> str:
        if not obj.alert_webhook_url:
            return "—"
        parts = urlsplit(obj.alert_webhook_url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"

    @admin.display(description="Alert email addresses")
    def alert_recipients(self, obj: Budget) -> str:
        return ", ".join(obj.alert_emails) or "—"

    @admin.display(description="Raised")
    def alerts_link(self, obj: Budget) -> SafeString:
        return _alerts_link(BudgetAlert.objects.filter(budget_id=obj.pk).count(), budget=obj.pk)

    def save_model(self, request: HttpRequest, obj: Budget, form: forms.Form, change: bool) -> None:
        data = form.cleaned_data
        if change:
            changes = {name: data[name] for name in form.changed_data if name in form.fields}
            saved = accounts.budget_update(budget_id=obj.pk, **changes)
        else:
            saved = accounts.budget_create(
                name=data["name"],
                max_budget_usd=data["max_budget_usd"],
                budget_duration_sec=data["budget_duration_sec"],
                reset_alignment=data["reset_alignment"] or None,
                **{name: data[name] for name in ALERT_FIELDS},
            )
        self.adopt(obj, saved)

    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        accounts.budget_delete(budget_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for budget_id in queryset.values_list("pk", flat=True):
            try:
                accounts.budget_delete(budget_id=budget_id)
            except Conflict as exc:
                messages.error(request, f"{budget_id}: {exc.message}")


def _alerts_link(count: int, *, budget: str | None = None, user: str | None = None) -> SafeString:
    """ "N alerts", linking to the alert list filtered to a budget or a user."""
    query = {"budget__budget_id__exact": budget} if budget is not None else {"user": user}
    if not count:
        return format_html('<span class="otari-muted">{}</span>', "No alerts yet.")
    return format_html(
        '<a href="{}">{} alert{}</a>',
        _admin_url(BudgetAlert, "changelist", query=query),
        f"{count:,}",
        "s" if count != 1 else "",
    )


# ---------------------------------------------------------------------------------------
# Users


def _model_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise forms.ValidationError(
            'Enter a JSON list of model names, such as ["openai:gpt-4o-mini"].'
        )
    return value


def _metadata(value: Any) -> dict[str, Any]:
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


_RATE_LIMITS_DESCRIPTION = (
    "Over a limit, requests are refused with 429 and Retry-After until the minute's window "
    "ends. Empty = no limit. Applies from the next request, in every gateway process."
)


def _limits_cell(obj: GatewayUser | APIKey) -> SafeString:
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


class UserForm(forms.ModelForm):
    rpm_limit = rpm_limit_field("All of this user's requests, whatever the key.")
    tpm_limit = tpm_limit_field(
        "Prompt and completion tokens of all of this user's requests (estimated when a "
        "request starts, corrected when it ends)."
    )

    class Meta:
        model = GatewayUser
        fields = [
            "user_id",
            "alias",
            "budget",
            "blocked",
            "topup_usd",
            "topup_expires_at",
            "allowed_models",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        labels = {
            "user_id": "User id",
            "topup_usd": "Top-up (USD)",
            "topup_expires_at": "Top-up expires at",
            "blocked": "Blocked",
        }
        help_texts = {
            "user_id": "The id API callers and the management API use; cannot be changed.",
            "budget": "Moving the user to a different budget starts a fresh window: "
            "spend goes to $0.00 (the old spend is kept in the reset log).",
            "blocked": "A blocked user's requests are refused with 403 user_blocked.",
            "topup_usd": "Added to the budget's limit until the expiry below. Set 0 to remove it.",
            "topup_expires_at": "UTC. Required with a top-up, and in the future.",
            "allowed_models": 'A JSON list such as ["openai:gpt-4o-mini", "anthropic:*"]; '
            "empty = any model, [] = none.",
            "metadata": "A JSON object, for your own use.",
        }

    def clean_allowed_models(self) -> list[str] | None:
        return _model_list(self.cleaned_data.get("allowed_models"))

    def clean_metadata(self) -> dict[str, Any]:
        return _metadata(self.cleaned_data.get("metadata"))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if {"topup_usd", "topup_expires_at"} & set(self.changed_data):
            amount = cleaned.get("topup_usd")
            expires_at = cleaned.get("topup_expires_at")
            if amount and expires_at is None:
                self.add_error("topup_expires_at", "Give the top-up an expiry time.")
            elif amount and expires_at <= timezone.now():
                self.add_error("topup_expires_at", "The expiry must be in the future.")
            elif expires_at is not None and not amount and "topup_usd" not in self.errors:
                self.add_error("topup_usd", "Enter the top-up amount, or clear the expiry.")
        return cleaned


class UsageLevelFilter(admin.SimpleListFilter):
    """Against the limit admission checks (spend + reserved vs budget + live top-up)."""

    title = "budget usage"
    parameter_name = "usage"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [
            ("near", "80% or more"),
            ("over", "At or over the limit, or refused for budget"),
            ("uncapped", "No limit"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "near":
            return queryset.filter(
                cap_usd__isnull=False, committed_usd__gte=F("cap_usd") * Decimal("0.8")
            )
        if self.value() == "over":
            return queryset.filter(
                Q(committed_usd__gte=F("cap_usd")) | Q(budget_refused_at__isnull=False),
                cap_usd__isnull=False,
            )
        if self.value() == "uncapped":
            return queryset.filter(cap_usd__isnull=True)
        return queryset


class UserStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("active", "Active"), ("blocked", "Blocked"), ("deleted", "Deleted")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "active":
            return queryset.filter(deleted_at__isnull=True, blocked=False)
        if self.value() == "blocked":
            return queryset.filter(deleted_at__isnull=True, blocked=True)
        if self.value() == "deleted":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


@admin.register(GatewayUser)
class GatewayUserAdmin(SettingHistoryMixin, ServiceAdmin):
    form = UserForm
    list_display = [
        "user_id",
        "alias",
        "budget_link",
        "spend",
        "reserved",
        "limit",
        "remaining",
        "usage",
        "next_reset",
        "limits",
        "state",
    ]
    list_display_links = ["user_id"]
    list_filter = [UsageLevelFilter, "budget", UserStateFilter]
    list_select_related = ["budget"]
    search_fields = ["user_id", "alias"]
    search_help_text = "Search by user id or alias."
    actions = ["block_users", "unblock_users", "reset_period_now"]
    readonly_fields = [
        "spend",
        "reserved",
        "limit",
        "remaining",
        "usage",
        "budget_refusal",
        "lifetime_spend",
        "topup_state",
        "budget_started_at",
        "next_budget_reset_at",
        "period",
        "api_keys_table",
        "recent_usage",
        "alerts_link",
        "created_at",
        "updated_at",
        "deleted_at",
    ]
    delete_confirmation_template = "admin/budgets/gatewayuser/delete_confirmation.html"
    delete_selected_confirmation_template = (
        "admin/budgets/gatewayuser/delete_selected_confirmation.html"
    )

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, obj: Any = None, **kw: Any
    ) -> Any:
        # The user's spend per day: one aggregate on their (user, time) index.
        if obj is not None and request.user.has_perm("usage.view_usagelog"):
            days = spend_by_day(now=timezone.now(), days=USER_CHART_DAYS, user_id=obj.pk)
            context["otari_chart"] = daily_spend_chart(days)
            context["otari_chart_title"] = f"Spend per day, last {USER_CHART_DAYS} days (UTC)"
        return super().render_change_form(request, context, *args, obj=obj, **kw)

    def get_fieldsets(self, request: HttpRequest, obj: GatewayUser | None = None) -> list:
        if obj is None:
            return [
                (None, {"fields": ["user_id", "alias", "budget", "blocked"]}),
                ("Temporary top-up", {"fields": ["topup_usd", "topup_expires_at"]}),
                (
                    "Rate limits",
                    {
                        "fields": [("rpm_limit", "tpm_limit")],
                        "description": _RATE_LIMITS_DESCRIPTION,
                    },
                ),
                ("Access", {"fields": ["allowed_models", "metadata"]}),
            ]
        return [
            (None, {"fields": ["alias", "budget", "blocked"]}),
            (
                "This period",
                {
                    "fields": [
                        "usage",
                        "budget_refusal",
                        ("spend", "reserved"),
                        ("limit", "remaining"),
                        "period",
                        ("budget_started_at", "next_budget_reset_at"),
                        "lifetime_spend",
                    ],
                    "description": "Computed by the gateway; never edited by hand. Use the "
                    "“Reset budget period now” action to start a fresh window.",
                },
            ),
            (
                "Temporary top-up",
                {
                    "fields": ["topup_state", "topup_usd", "topup_expires_at"],
                    "description": "Raises this user's limit until the expiry; replaces "
                    "any previous top-up.",
                },
            ),
            (
                "Rate limits",
                {
                    "fields": [("rpm_limit", "tpm_limit")],
                    "description": _RATE_LIMITS_DESCRIPTION
                    + " Each key may have limits of its own as well.",
                },
            ),
            ("API keys", {"fields": ["api_keys_table"]}),
            ("Recent requests", {"fields": ["recent_usage"]}),
            *(
                [("Budget alerts", {"fields": ["alerts_link"]})]
                if request.user.has_perm("budgets.view_budgetalert")
                else []
            ),
            ("Access", {"fields": ["allowed_models", "metadata"], "classes": ["collapse"]}),
            ("Record", {"fields": ["created_at", "updated_at", "deleted_at"]}),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return user_money_annotate(super().get_queryset(request), now=timezone.now())

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "budget" and field is not None:
            # Editing or deleting a budget from a user's page would change it for every
            # user on it: that belongs on the budget's own page.
            field.widget.can_change_related = False
            field.widget.can_delete_related = False
        return field

    # -- columns -------------------------------------------------------------------------

    @admin.display(description="Budget", ordering="budget__name")
    def budget_link(self, obj: GatewayUser) -> SafeString | str:
        if obj.budget is None:
            return "—"
        return format_html(
            '<a href="{}">{}</a>', _admin_url(Budget, "change", obj.budget_id), str(obj.budget)
        )

    @admin.display(description="Spend", ordering="spend_usd")
    def spend(self, obj: GatewayUser) -> SafeString:
        return _money_cell(obj.spend_usd)

    @admin.display(description="Reserved", ordering="reserved_usd")
    def reserved(self, obj: GatewayUser) -> SafeString:
        return _money_cell(obj.reserved_usd)

    @admin.display(description="Limit", ordering="cap_usd")
    def limit(self, obj: GatewayUser) -> SafeString:
        if obj.cap_usd is None:
            return format_html('<span class="otari-muted">{}</span>', "uncapped")
        if obj.topup_usd and rules.topup_live(obj.topup_expires_at, timezone.now()):
            return format_html(
                '<span class="otari-money" title="Includes a top-up of {} until {}">{} *</span>',
                format_usd(obj.topup_usd),
                as_utc(obj.topup_expires_at),
                format_usd(obj.cap_usd),
            )
        return _money_cell(obj.cap_usd)

    @admin.display(description="Left")
    def remaining(self, obj: GatewayUser) -> SafeString:
        if obj.cap_usd is None:
            return format_html('<span class="otari-muted">{}</span>', "—")
        return _money_cell(max(ZERO, obj.cap_usd - obj.committed_usd))

    @admin.display(description="Usage", ordering="used_ratio")
    def usage(self, obj: GatewayUser) -> SafeString:
        return usage_bar(
            spend=obj.spend_usd,
            reserved=obj.reserved_usd,
            limit=obj.cap_usd,
            refused_at=obj.budget_refused_at,
        )

    @admin.display(description="Refused for budget")
    def budget_refusal(self, obj: GatewayUser) -> SafeString | str:
        if obj.budget_refused_at is None:
            return "not in this period"
        from usage.models import UsageLog

        refusals = _admin_url(
            UsageLog, "changelist", query={"user": obj.user_id, "status__exact": "error"}
        )
        return format_html(
            '<span class="otari-usage__refused">last at {}</span>: requests do not fit what '
            'is left. <a href="{}">See the failed requests</a>',
            as_utc(obj.budget_refused_at),
            refusals,
        )

    @admin.display(description="Next reset (UTC)", ordering="next_budget_reset_at")
    def next_reset(self, obj: GatewayUser) -> str:
        if obj.next_budget_reset_at is None:
            return "never" if obj.budget_id else "—"
        return as_utc(obj.next_budget_reset_at, zone=False)

    @admin.display(description="Rate limits")
    def limits(self, obj: GatewayUser) -> SafeString:
        return _limits_cell(obj)

    @admin.display(description="State", ordering="blocked")
    def state(self, obj: GatewayUser) -> SafeString:
        if obj.deleted_at is not None:
            return badge("muted", "deleted")
        if obj.blocked:
            return badge("bad", "blocked")
        return badge("good", "active")

    @admin.display(description="Top-up now")
    def topup_state(self, obj: GatewayUser) -> SafeString:
        if not obj.topup_usd or obj.topup_expires_at is None:
            return format_html('<span class="otari-muted">{}</span>', "none")
        if not rules.topup_live(obj.topup_expires_at, timezone.now()):
            return format_html(
                '{} <span class="otari-muted">of {}, expired {}</span>',
                badge("muted", "expired"),
                format_usd(obj.topup_usd),
                as_utc(obj.topup_expires_at),
            )
        return format_html(
            "{} +{} until {}",
            badge("good", "active"),
            format_usd(obj.topup_usd),
            as_utc(obj.topup_expires_at),
        )

    @admin.display(description="Lifetime spend")
    def lifetime_spend(self, obj: GatewayUser) -> SafeString:
        return _money_cell(obj.lifetime_spend_usd)

    @admin.display(description="Period")
    def period(self, obj: GatewayUser) -> str:
        return describe_period(obj.budget)

    @admin.display(description="Keys")
    def api_keys_table(self, obj: GatewayUser) -> SafeString:
        return render_to_string(
            "admin/budgets/gatewayuser/keys_table.html",
            {
                "keys": list(obj.api_keys.all()[:USER_KEYS_SHOWN]),
                "add_url": _admin_url(APIKey, "add", query={"user": obj.pk}),
            },
        )

    @admin.display(description="Requests")
    def recent_usage(self, obj: GatewayUser) -> SafeString:
        from usage.models import UsageLog

        rows = (
            UsageLog.objects.filter(user_id=obj.pk)
            .only("id", "timestamp", "model", "provider", "status", "status_code", "cost_usd")
            .order_by("-timestamp")[:USER_RECENT_USAGE_SHOWN]
        )
        return render_to_string(
            "admin/budgets/gatewayuser/recent_usage.html",
            {
                "rows": list(rows),
                "all_url": _admin_url(UsageLog, "changelist", query={"user": obj.pk}),
            },
        )

    @admin.display(description="Raised")
    def alerts_link(self, obj: GatewayUser) -> SafeString:
        return _alerts_link(BudgetAlert.objects.filter(user_id=obj.pk).count(), user=obj.pk)

    # -- saving through the services -------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: GatewayUser, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        if change:
            changes = {
                name: data[name]
                for name in (
                    "alias",
                    "blocked",
                    "allowed_models",
                    "metadata",
                    "budget",
                    "rpm_limit",
                    "tpm_limit",
                )
                if name in form.changed_data
            }
            if changes:
                accounts.user_update(user_id=obj.pk, **changes)
        else:
            accounts.user_create(
                user_id=data["user_id"],
                alias=data["alias"],
                budget=data["budget"],
                blocked=data["blocked"],
                allowed_models=data["allowed_models"],
                metadata=data["metadata"],
                rpm_limit=data["rpm_limit"],
                tpm_limit=data["tpm_limit"],
            )
        if {"topup_usd", "topup_expires_at"} & set(form.changed_data):
            accounts.user_topup_set(
                user_id=obj.pk,
                amount_usd=data.get("topup_usd") or ZERO,
                expires_at=data.get("topup_expires_at"),
            )
        self.adopt(obj, obj)

    # Deleting a user is soft (docs/SPEC.md §6): the row, its usage and its history stay, its
    # keys stop working. Nothing else is deleted, so the confirmation lists only the user.
    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        return [str(o) for o in objs], {self.opts.verbose_name_plural: len(objs)}, set(), []

    def delete_model(self, request: HttpRequest, obj: GatewayUser) -> None:
        accounts.user_delete(user_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for user_id in queryset.values_list("pk", flat=True):
            accounts.user_delete(user_id=user_id)

    # -- actions ---------------------------------------------------------------------

    def _set_blocked(self, request: HttpRequest, queryset: QuerySet, blocked: bool) -> None:
        changed = 0
        for user in queryset.filter(blocked=not blocked):
            accounts.user_update(user_id=user.pk, blocked=blocked)
            self.log_change(request, user, [{"changed": {"fields": ["Blocked"]}}])
            changed += 1
        verb = "Blocked" if blocked else "Unblocked"
        self.message_user(request, f"{verb} {changed} user{'s' if changed != 1 else ''}.")

    @admin.action(description="Block selected users", permissions=["change"])
    def block_users(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_blocked(request, queryset, True)

    @admin.action(description="Unblock selected users", permissions=["change"])
    def unblock_users(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_blocked(request, queryset, False)

    @admin.action(description="Reset budget period now", permissions=["change"])
    def reset_period_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        total = ZERO
        users = list(queryset.order_by("pk"))
        for user in users:
            log = periods.user_period_reset(user_id=user.pk, now=now)
            total += log.previous_spend_usd
            self.log_change(
                request,
                user,
                f"Reset the budget period: spend {format_usd(log.previous_spend_usd)} moved "
                "to the reset log.",
            )
        count = len(users)
        self.message_user(
            request,
            f"Started a fresh budget period for {count} user{'s' if count != 1 else ''}; "
            f"{format_usd(total)} of spend moved to the reset log.",
            messages.SUCCESS,
        )


# ---------------------------------------------------------------------------------------
# API keys


class _KeyFormBase(forms.ModelForm):
    rpm_limit = rpm_limit_field("Requests with this key, on top of its user's limit.")
    tpm_limit = tpm_limit_field("Tokens of requests with this key, on top of its user's limit.")

    def clean_allowed_models(self) -> list[str] | None:
        return _model_list(self.cleaned_data.get("allowed_models"))

    def clean_metadata(self) -> dict[str, Any]:
        return _metadata(self.cleaned_data.get("metadata"))

    def clean_expires_at(self) -> Any:
        value = self.cleaned_data.get("expires_at")
        if value is not None and "expires_at" in self.changed_data and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value


_KEY_HELP = {
    "key_name": "A label to recognise the key by, such as “ci” or “alice's laptop”.",
    "expires_at": "UTC. Empty = never expires.",
    "allowed_models": 'A JSON list such as ["openai:gpt-4o-mini"]; empty = the user\'s list.',
    "exclude_from_budget": "Requests with this key are logged with their cost but never held "
    "or charged to the budget.",
    "is_active": "Untick to revoke the key: it stops working on the next request.",
}


class KeyAddForm(_KeyFormBase):
    class Meta:
        model = APIKey
        fields = [
            "user",
            "key_name",
            "expires_at",
            "allowed_models",
            "exclude_from_budget",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        help_texts = _KEY_HELP


class KeyChangeForm(_KeyFormBase):
    class Meta:
        model = APIKey
        fields = [
            "key_name",
            "is_active",
            "expires_at",
            "allowed_models",
            "exclude_from_budget",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        help_texts = _KEY_HELP


class KeyExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("expired", "Expired"), ("week", "Expires within 7 days"), ("never", "Never")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        if self.value() == "week":
            return queryset.filter(expires_at__gt=now, expires_at__lte=now + timedelta(days=7))
        if self.value() == "never":
            return queryset.filter(expires_at__isnull=True)
        return queryset


@admin.register(APIKey)
class APIKeyAdmin(SettingHistoryMixin, ServiceAdmin):
    """Keys: created, edited, revoked and rotated through the services. The secret is
    rendered once, in the response to the request that made it; it is never stored (not
    in the database, the session or the messages) and the hash is never shown."""

    list_display = [
        "key",
        "key_name",
        "owner",
        "state",
        "expires",
        "last_used",
        "created_at",
        "budget_mode",
        "limits",
    ]
    list_filter = ["is_active", KeyExpiryFilter, "exclude_from_budget"]
    list_select_related = ["user"]
    search_fields = ["key_name", "key_prefix", "user__user_id", "user__alias"]
    search_help_text = "Search by key name, key prefix (gw-…), user id or alias."
    raw_id_fields = ["user"]
    actions = ["revoke_keys", "rotate_keys"]
    issued_key_template = "admin/budgets/apikey/key_secret.html"

    def get_form(
        self, request: HttpRequest, obj: APIKey | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm]:
        kwargs["form"] = KeyChangeForm if obj is not None else KeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: APIKey | None = None) -> list:
        if obj is None:
            return [
                (
                    None,
                    {
                        "fields": ["user", "key_name", "expires_at"],
                        "description": "The secret is shown once, on the next page. "
                        "Only its hash is stored.",
                    },
                ),
                ("Access", {"fields": ["allowed_models", "exclude_from_budget", "metadata"]}),
                self._rate_limits_fieldset,
            ]
        return [
            (None, {"fields": ["key", "owner", "key_name", "is_active", "expires_at"]}),
            ("Access", {"fields": ["allowed_models", "exclude_from_budget", "metadata"]}),
            self._rate_limits_fieldset,
            ("Record", {"fields": ["created_at", "updated_at", "last_used_at"]}),
        ]

    _rate_limits_fieldset = (
        "Rate limits",
        {
            "fields": [("rpm_limit", "tpm_limit")],
            "description": _RATE_LIMITS_DESCRIPTION + " The user's own limits apply as well.",
        },
    )

    def get_readonly_fields(self, request: HttpRequest, obj: APIKey | None = None) -> list:
        if obj is None:
            return []
        return ["key", "owner", "created_at", "updated_at", "last_used_at"]

    def has_delete_permission(self, request: HttpRequest, obj: APIKey | None = None) -> bool:
        # Usage rows refer to their key: revoke instead, and history keeps its key.
        return False

    @admin.display(description="Key", ordering="key_prefix")
    def key(self, obj: APIKey) -> SafeString:
        return format_html("<code>{}</code>", key_display(obj))

    @admin.display(description="User", ordering="user__user_id")
    def owner(self, obj: APIKey) -> SafeString:
        return user_link(obj.user_id, str(obj.user))

    @admin.display(description="State", ordering="is_active")
    def state(self, obj: APIKey) -> SafeString:
        return key_state(obj)

    @admin.display(description="Expires", ordering="expires_at")
    def expires(self, obj: APIKey) -> str:
        return as_utc(obj.expires_at) if obj.expires_at else "never"

    @admin.display(description="Last used", ordering="last_used_at")
    def last_used(self, obj: APIKey) -> str:
        return as_utc(obj.last_used_at) if obj.last_used_at else "never"

    @admin.display(description="Budget", ordering="exclude_from_budget")
    def budget_mode(self, obj: APIKey) -> SafeString | str:
        if obj.exclude_from_budget:
            return format_html(
                '<span class="otari-badge otari-badge--warn" title="{}">{}</span>',
                "Cost is logged but never held or charged",
                "excluded",
            )
        return "charged"

    @admin.display(description="Rate limits")
    def limits(self, obj: APIKey) -> SafeString:
        return _limits_cell(obj)

    def save_model(self, request: HttpRequest, obj: APIKey, form: forms.Form, change: bool) -> None:
        data = form.cleaned_data
        if change:
            changes = {name: data[name] for name in form.changed_data if name in form.fields}
            keys.api_key_update(key_id=obj.pk, **changes)
            self.adopt(obj, obj)
            return
        key, secret = keys.api_key_create(
            user=data["user"],
            key_name=data["key_name"],
            expires_at=data["expires_at"],
            allowed_models=data["allowed_models"],
            exclude_from_budget=data["exclude_from_budget"],
            metadata=data["metadata"],
            rpm_limit=data["rpm_limit"],
            tpm_limit=data["tpm_limit"],
        )
        # Handed to response_add through the request object only: it dies with this
        # request, and nothing persists it.
        request._otari_issued = [(key, secret)]
        self.adopt(obj, key)

    def response_add(self, request: HttpRequest, obj: APIKey, post_url_continue: Any = None):
        issued = getattr(request, "_otari_issued", None)
        if not issued:
            return super().response_add(request, obj, post_url_continue)
        return self._secret_response(request, issued, created=True)

    def _secret_response(
        self, request: HttpRequest, issued: list[tuple[APIKey, str]], *, created: bool
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Copy your new key now" if created else "Copy the rotated keys now",
            "issued": [(key, secret, key_display(key)) for key, secret in issued],
            "created": created,
        }
        response = TemplateResponse(request, self.issued_key_template, context)
        # Keep the page out of every cache (browser back/forward included).
        response["Cache-Control"] = "no-store, max-age=0"
        response["Pragma"] = "no-cache"
        return response

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for key in queryset.filter(is_active=True).order_by("pk"):
            keys.api_key_revoke(key_id=key.pk)
            self.log_change(request, key, "Revoked the key.")
            count += 1
        self.message_user(request, f"Revoked {count} key{'s' if count != 1 else ''}.")

    @admin.action(
        description="Rotate selected keys (new secret, old one stops working)",
        permissions=["change"],
    )
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse:
        issued = []
        for key in queryset.order_by("pk"):
            secret = keys.api_key_rotate(key=key)
            self.log_change(request, key, "Rotated the key's secret.")
            issued.append((key, secret))
        return self._secret_response(request, issued, created=False)


# ---------------------------------------------------------------------------------------
# Holds and reset logs: history


class StaleHoldFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "stale"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("yes", "Open past expiry (stale)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(status=Hold.Status.OPEN, expires_at__lte=timezone.now())
        return queryset


def _search_by_id(queryset: QuerySet, term: str, id_field: str) -> QuerySet:
    """Exact search on a ledger: a request id (UUID) or a user id. A substring search
    would read every row of a table that grows by one row per request."""
    term = term.strip()
    if not term:
        return queryset
    try:
        return queryset.filter(**{id_field: uuid.UUID(term)})
    except ValueError:
        return queryset.filter(user_id=term)


@admin.register(Hold)
class HoldAdmin(CsvExportMixin, LedgerAdmin):
    list_display = [
        "request",
        "owner",
        "amount",
        "state",
        "model_key",
        "created_at",
        "expires_at",
        "closed_at",
        "stale",
    ]
    list_filter = ["status", StaleHoldFilter, UserIdFilter]
    search_fields = ["request_id"]
    search_help_text = "Exact request id or user id."
    list_display_links = ["request"]
    date_hierarchy = "created_at"
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    actions = ["release_selected_stale"]
    csv_filename = "holds"
    csv_columns = (
        ("request_id", "request_id"),
        ("user_id", "user_id"),
        ("amount_usd", "amount_usd"),
        ("status", "status"),
        ("model_key", "model_key"),
        ("created_at", "created_at"),
        ("expires_at", "expires_at"),
        ("closed_at", "closed_at"),
    )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        return _search_by_id(queryset, search_term, "request_id"), False

    def get_urls(self) -> list:
        release = path(
            "release-stale/",
            self.admin_site.admin_view(self.release_stale_view),
            name="budgets_hold_release_stale",
        )
        return [release, *super().get_urls()]

    def has_release_permission(self, request: HttpRequest) -> bool:
        # Releasing a hold changes its user's `reserved`: the same right as changing users.
        return request.user.has_perm("budgets.change_gatewayuser")

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        extra = {"can_release_stale": self.has_release_permission(request)}
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    def release_stale_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseRedirect(_admin_url(Hold, "changelist"))
        if not self.has_release_permission(request):
            raise PermissionDenied
        now = timezone.now()
        released = holds.holds_expire_stale(now=now)
        self._log_released(request, now)
        self.message_user(
            request,
            f"Released {released} stale hold{'s' if released != 1 else ''}.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(_admin_url(Hold, "changelist"))

    def _log_released(self, request: HttpRequest, now: Any) -> None:
        """An admin-log entry per hold released at `now` (the services stamp closed_at
        with the `now` they were given, so these are exactly the holds this request
        expired)."""
        for hold in Hold.objects.filter(status=Hold.Status.EXPIRED, closed_at=now):
            self.log_change(
                request,
                hold,
                f"Released the stale hold: {format_usd(hold.amount_usd)} of {hold.user_id}'s "
                "reservation given back.",
            )

    @admin.action(
        description="Release selected holds that are past expiry", permissions=["release"]
    )
    def release_selected_stale(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        released = 0
        for request_id in queryset.filter(status=Hold.Status.OPEN, expires_at__lte=now).values_list(
            "request_id", flat=True
        ):
            released += holds.hold_expire(request_id=request_id, now=now)
        self._log_released(request, now)
        skipped = queryset.count() - released
        note = f" ({skipped} not open or not yet expired, left alone)" if skipped else ""
        self.message_user(request, f"Released {released} stale hold(s){note}.")

    @admin.display(description="Request", ordering="request_id")
    def request(self, obj: Hold) -> SafeString:
        return format_html('<code title="{}">{}…</code>', obj.request_id, str(obj.request_id)[:8])

    @admin.display(description="User", ordering="user_id")
    def owner(self, obj: Hold) -> SafeString:
        return user_link(obj.user_id)

    @admin.display(description="Status", ordering="status")
    def state(self, obj: Hold) -> SafeString:
        tone = {"open": "warn", "settled": "good", "refunded": "muted", "expired": "bad"}
        return badge(tone.get(obj.status, "muted"), obj.status)

    @admin.display(description="Amount", ordering="amount_usd")
    def amount(self, obj: Hold) -> SafeString:
        return _money_cell(obj.amount_usd)

    @admin.display(description="Stale", boolean=True)
    def stale(self, obj: Hold) -> bool:
        return obj.status == Hold.Status.OPEN and obj.expires_at <= timezone.now()


@admin.register(BudgetResetLog)
class BudgetResetLogAdmin(CsvExportMixin, LedgerAdmin):
    list_display = ["reset_at", "owner", "budget_name", "previous_spend", "next_reset_at"]
    list_filter = ["budget", UserIdFilter]
    list_select_related = ["budget"]
    date_hierarchy = "reset_at"
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    csv_filename = "budget-resets"
    csv_columns = (
        ("user_id", "user_id"),
        ("budget_id", "budget_id"),
        ("previous_spend_usd", "previous_spend_usd"),
        ("reset_at", "reset_at"),
        ("next_reset_at", "next_reset_at"),
    )

    @admin.display(description="User", ordering="user_id")
    def owner(self, obj: BudgetResetLog) -> SafeString:
        return user_link(obj.user_id)

    @admin.display(description="Budget")
    def budget_name(self, obj: BudgetResetLog) -> str:
        # The budget may have been deleted since (its history is kept).
        return str(obj.budget) if obj.budget is not None else (obj.budget_id or "—")

    @admin.display(description="Spend before the reset", ordering="previous_spend_usd")
    def previous_spend(self, obj: BudgetResetLog) -> SafeString:
        return _money_cell(obj.previous_spend_usd)


# ---------------------------------------------------------------------------------------
# Budget alerts: history (docs/OPERATIONS.md)


class DeliveryStateFilter(admin.SimpleListFilter):
    title = "delivery state"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [
            (BudgetAlert.Status.PENDING, "Pending (being delivered or retried)"),
            (BudgetAlert.Status.DELIVERED, "Delivered"),
            (BudgetAlert.Status.FAILED, "Failed"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(status=self.value())
        return queryset


class ThresholdFilter(admin.SimpleListFilter):
    title = "threshold"
    parameter_name = "threshold"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        # A handful of distinct values (at most ten per budget).
        values = BudgetAlert.objects.order_by("threshold_pct").values_list(
            "threshold_pct", flat=True
        )
        return [(str(v), f"{v}%") for v in values.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value and value.isascii() and value.isdigit():
            return queryset.filter(threshold_pct=int(value))
        if value:
            return queryset.none()
        return queryset


@admin.register(BudgetAlert)
class BudgetAlertAdmin(CsvExportMixin, LedgerAdmin):
    """Alerts raised by budgets.services (one per user, budget, threshold and period),
    with their delivery state. Read-only: delivery and its retries belong to the
    services and the beat sweep."""

    list_display = [
        "raised_at",
        "owner",
        "budget_name",
        "threshold",
        "spend",
        "limit",
        "period_end",
        "state",
        "channels",
        "attempts",
    ]
    list_display_links = ["raised_at"]
    list_filter = [DeliveryStateFilter, ThresholdFilter, "budget", UserIdFilter]
    search_fields = ["user__user_id"]
    search_help_text = "Exact user id."
    show_facets = ShowFacets.NEVER
    fieldsets = [
        (None, {"fields": ["raised_at", "owner", "budget_name", "threshold"]}),
        (
            "When it was raised",
            {"fields": [("spend", "limit"), ("period_started_at", "period_ends_at")]},
        ),
        (
            "Delivery",
            {
                "fields": [
                    "state",
                    "channels",
                    ("webhook_delivered_at", "email_delivered_at"),
                    ("attempts", "last_attempt_at"),
                    "last_error",
                ]
            },
        ),
    ]
    csv_filename = "budget-alerts"
    csv_columns = (
        ("alert_id", "id"),
        ("created_at", "created_at"),
        ("user_id", "user_id"),
        ("budget_id", "budget_id"),
        ("threshold_pct", "threshold_pct"),
        ("spend_usd", "spend_usd"),
        ("limit_usd", "limit_usd"),
        ("period_started_at", "period_started_at"),
        ("period_ends_at", "period_ends_at"),
        ("status", "status"),
        ("attempts", "attempts"),
        ("webhook_delivered_at", "webhook_delivered_at"),
        ("email_delivered_at", "email_delivered_at"),
        ("last_error", "last_error"),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # The budget's name by subquery, not a join: the budget may have been deleted
        # since (its alerts are kept), and an inner join would hide those alerts.
        budget = Budget.objects.filter(pk=OuterRef("budget_id"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                budget_label=Subquery(budget.values("name")[:1]),
                budget_max_usd=Subquery(budget.values("max_budget_usd")[:1]),
            )
        )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        # Exact, as on the other history lists.
        term = search_term.strip()
        return (queryset.filter(user_id=term) if term else queryset), False

    @admin.display(description="Raised (UTC)", ordering="created_at")
    def raised_at(self, obj: BudgetAlert) -> str:
        return as_utc(obj.created_at, zone=False)

    @admin.display(description="User", ordering="user_id")
    def owner(self, obj: BudgetAlert) -> SafeString:
        return user_link(obj.user_id)

    @admin.display(description="Budget", ordering="budget_label")
    def budget_name(self, obj: BudgetAlert) -> SafeString | str:
        if obj.budget_label is None:
            return f"{obj.budget_id} (deleted)"
        return format_html(
            '<a href="{}">{}</a>',
            _admin_url(Budget, "change", obj.budget_id),
            str(
                Budget(
                    budget_id=obj.budget_id,
                    name=obj.budget_label,
                    max_budget_usd=obj.budget_max_usd,
                )
            ),
        )

    @admin.display(description="Threshold", ordering="threshold_pct")
    def threshold(self, obj: BudgetAlert) -> str:
        return f"{obj.threshold_pct}%"

    @admin.display(description="Spend then", ordering="spend_usd")
    def spend(self, obj: BudgetAlert) -> SafeString:
        return _money_cell(obj.spend_usd)

    @admin.display(description="Limit then", ordering="limit_usd")
    def limit(self, obj: BudgetAlert) -> SafeString:
        return _money_cell(obj.limit_usd)

    @admin.display(description="Period ends (UTC)", ordering="period_ends_at")
    def period_end(self, obj: BudgetAlert) -> str:
        return as_utc(obj.period_ends_at, zone=False) if obj.period_ends_at else "never"

    @admin.display(description="Delivery", ordering="status")
    def state(self, obj: BudgetAlert) -> SafeString:
        tone = {"pending": "warn", "delivered": "good", "failed": "bad"}
        return badge(tone.get(obj.status, "muted"), obj.status)

    @admin.display(description="Sent to")
    def channels(self, obj: BudgetAlert) -> SafeString | str:
        # The webhook's URL is not shown: it may carry a token. Where it went now is on
        # the budget's page.
        parts = []
        if obj.webhook_url:
            parts.append(("webhook", obj.webhook_delivered_at))
        if obj.emails:
            parts.append((f"email ({', '.join(obj.emails)})", obj.email_delivered_at))
        if not parts:
            return "—"
        return format_html_join(
            ", ",
            "{}{}",
            ((label, " ✓" if delivered else "") for label, delivered in parts),
        )
