"""The console's budgets: their form (period, alerts) and page (users, spend, resets)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets import alerting
from budgets.admin.display import BUDGET_USERS_SHOWN, console_url, describe_period, money_cell
from budgets.admin_history import SettingHistoryMixin
from budgets.models import (
    Budget,
    BudgetAlert,
    GatewayUser,
)
from budgets.selectors import user_money_annotate
from budgets.services import accounts
from common.admin_tools import (
    ZERO,
    ServiceAdmin,
)
from common.exceptions import Conflict

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
        return money_cell(obj.max_budget_usd)

    @admin.display(description="Period")
    def period(self, obj: Budget) -> str:
        return describe_period(obj)

    @admin.display(description="Users", ordering="user_count")
    def user_count(self, obj: Budget) -> SafeString:
        return format_html(
            '<a href="{}">{}</a>',
            console_url(GatewayUser, "changelist", query={"budget__budget_id__exact": obj.pk}),
            f"{obj.user_count:,}",
        )

    @admin.display(description="Spend this period (all users)", ordering="total_spend")
    def total_spend(self, obj: Budget) -> SafeString:
        return money_cell(obj.total_spend)

    @admin.display(description="Reserved now", ordering="total_reserved")
    def total_reserved(self, obj: Budget) -> SafeString:
        return money_cell(obj.total_reserved)

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
                "all_url": console_url(
                    GatewayUser, "changelist", query={"budget__budget_id__exact": obj.pk}
                ),
                "add_url": console_url(GatewayUser, "add", query={"budget": obj.pk}),
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
        return alerts_link(BudgetAlert.objects.filter(budget_id=obj.pk).count(), budget=obj.pk)

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


def alerts_link(count: int, *, budget: str | None = None, user: str | None = None) -> SafeString:
    """ "N alerts", linking to the alert list filtered to a budget or a user."""
    query = {"budget__budget_id__exact": budget} if budget is not None else {"user": user}
    if not count:
        return format_html('<span class="otari-muted">{}</span>', "No alerts yet.")
    return format_html(
        '<a href="{}">{} alert{}</a>',
        console_url(BudgetAlert, "changelist", query=query),
        f"{count:,}",
        "s" if count != 1 else "",
    )
