"""The platform usage-report outbox in the admin (CONTRACT §7, §8): dead letters with
their last status, and a re-drive action. Self-contained, imported by usage/admin.py.

Reports are history: nothing on them is editable, and they are never deleted here. The
one operation is the re-drive, which calls the same service as
`manage.py redrive_usage_reports`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages

from usage.models import UsageReport
from usage.services import usage_reports_redrive_dead

if TYPE_CHECKING:
    from django.db.models import QuerySet
    from django.http import HttpRequest


@admin.register(UsageReport)
class UsageReportAdmin(admin.ModelAdmin):
    list_display = (
        "correlation_id",
        "delivery_status",
        "last_status_code",
        "attempts",
        "status",
        "is_final_attempt",
        "user",
        "provider",
        "model",
        "created_at",
        "next_attempt_at",
    )
    list_filter = ("delivery_status", "last_status_code", "status", "is_final_attempt")
    search_fields = ("correlation_id", "=request_id", "platform_request_id", "user__user_id")
    list_select_related = ("user",)
    raw_id_fields = ("user",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    actions = ("redrive_reports",)
    readonly_fields = [field.name for field in UsageReport._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # History: shown, never edited (the detail page is Django's read-only view).
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_redrive_permission(self, request: HttpRequest) -> bool:
        """Re-driving changes delivery state: for those the auth system lets change
        reports, although the admin itself never edits one."""
        return request.user.has_perm("usage.change_usagereport")

    @admin.action(description="Re-drive the selected dead reports", permissions=["redrive"])
    def redrive_reports(self, request: HttpRequest, queryset: QuerySet[UsageReport]) -> None:
        count = usage_reports_redrive_dead(report_ids=list(queryset.values_list("pk", flat=True)))
        skipped = queryset.count() - count
        self.message_user(
            request,
            f"Re-drove {count} dead report(s)"
            + (f"; {skipped} not dead, left alone" if skipped > 0 else ""),
            messages.SUCCESS,
        )
