"""The console's ledgers of holds and period resets: history, read-only for everyone,
filterable and exportable."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets.admin.display import console_url, money_cell, user_link
from budgets.models import (
    BudgetResetLog,
    Hold,
)
from budgets.services import holds
from common.admin_tools import (
    CsvExportMixin,
    EstimatedCountPaginator,
    LedgerAdmin,
    UserIdFilter,
    badge,
    format_usd,
)

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
            return HttpResponseRedirect(console_url(Hold, "changelist"))
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
        return HttpResponseRedirect(console_url(Hold, "changelist"))

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
        return money_cell(obj.amount_usd)

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
        return money_cell(obj.previous_spend_usd)
