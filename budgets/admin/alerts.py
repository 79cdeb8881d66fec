"""The console's budget alerts: history of thresholds reached and their delivery."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from budgets.admin.display import console_url, money_cell, user_link
from budgets.models import (
    Budget,
    BudgetAlert,
)
from common.admin_tools import (
    CsvExportMixin,
    LedgerAdmin,
    UserIdFilter,
    as_utc,
    badge,
)

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
            console_url(Budget, "change", obj.budget_id),
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
        return money_cell(obj.spend_usd)

    @admin.display(description="Limit then", ordering="limit_usd")
    def limit(self, obj: BudgetAlert) -> SafeString:
        return money_cell(obj.limit_usd)

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
