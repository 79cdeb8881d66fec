"""The console's workspaces (issue 14): groups of keys that a ceiling can cap together.
Created, renamed and deleted through budgets.services.tenancy, the functions the API
calls; a workspace still holding keys or usage is not deleted, with the service's reason.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, Q
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets.admin.ceilings import ceilings_table
from budgets.admin.display import (
    ceiling_bar,
    console_url,
    money_cell,
    muted,
    workspace_keys,
)
from budgets.models import DEFAULT_WORKSPACE_ID, APIKey, Ceiling, Workspace
from budgets.services import tenancy
from common.admin_tools import (
    ZERO,
    PageRowsMixin,
    RefusableDeleteMixin,
    ServiceAdmin,
)
from usage.selectors import month_window, spend_per_workspace

WORKSPACE_KEYS_SHOWN = 50


def spend_this_month(workspace_ids: list[Any]) -> dict[str, tuple[Decimal, int]]:
    """{workspace id: (spend, requests)} this UTC calendar month, as on the dashboard."""
    start, end = month_window(timezone.now())
    shares = spend_per_workspace(
        start=start, end=end, default_workspace_id=DEFAULT_WORKSPACE_ID, workspace_ids=workspace_ids
    )
    return {share.key: (share.spend_usd, share.requests) for share in shares}


class WorkspaceForm(forms.ModelForm):
    class Meta:
        model = Workspace
        fields = ["name", "description"]
        help_texts = {
            "name": "Unique in the deployment, such as “research” or “ci”.",
            "description": "Optional: what the workspace is for.",
        }

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        taken = Workspace.objects.filter(name=name).exclude(pk=self.instance.pk)
        if name and taken.exists():
            raise forms.ValidationError(f"A workspace named “{name}” already exists.")
        return name


@admin.register(Workspace)
class WorkspaceAdmin(PageRowsMixin, RefusableDeleteMixin, ServiceAdmin):
    form = WorkspaceForm
    list_display = ["name", "description", "keys", "month_spend", "month_requests", "ceiling"]
    search_fields = ["name", "description"]
    search_help_text = "Search by name or description."
    readonly_fields = [
        "keys_table",
        "ceilings_table",
        "month_spend",
        "month_requests",
        "id",
        "created_at",
        "updated_at",
    ]

    def get_fieldsets(self, request: HttpRequest, obj: Workspace | None = None) -> list:
        main = (
            None,
            {
                "fields": ["name", "description"],
                "description": "A key's workspace is chosen when the key is created and "
                "never changes. Keys created without one belong to the default workspace.",
            },
        )
        if obj is None:
            return [main]
        return [
            main,
            (
                "This month (UTC)",
                {
                    "fields": [("month_spend", "month_requests")],
                    "description": "The cost of every request made with the workspace's "
                    "keys since the 1st, keys excluded from budgets included (the "
                    "dashboard's spend).",
                },
            ),
            ("Ceilings", {"fields": ["ceilings_table"]}),
            ("Keys and their users", {"fields": ["keys_table"]}),
            ("Record", {"fields": ["id", "created_at", "updated_at"]}),
        ]

    def page_rows(self, request: HttpRequest, rows: list[Workspace]) -> None:
        """Keys, this month's spend and the every-provider ceiling of the page's
        workspaces: three grouped queries whatever the number of rows."""
        ids = [w.pk for w in rows]
        keys: dict[Any, tuple[int, int]] = {}
        grouped = (
            APIKey.objects.filter(Q(workspace_id__in=ids) | Q(workspace__isnull=True))
            .values("workspace_id")
            .annotate(total=Count("*"), active=Count("pk", filter=Q(is_active=True)))
            .order_by()
        )
        for row in grouped:
            key = row["workspace_id"] or DEFAULT_WORKSPACE_ID
            total, active = keys.get(key, (0, 0))
            keys[key] = (total + row["total"], active + row["active"])
        spend = spend_this_month(ids)
        caps = {
            c.scope_id: c
            for c in Ceiling.objects.filter(
                scope_type=Ceiling.Scope.WORKSPACE, provider="", scope_id__in=[str(i) for i in ids]
            ).select_related("budget")
        }
        for workspace in rows:
            workspace.key_counts = keys.get(workspace.pk, (0, 0))
            workspace.month = spend.get(str(workspace.pk), (ZERO, 0))
            workspace.cap = caps.get(str(workspace.pk))

    def _month(self, obj: Workspace) -> tuple[Decimal, int]:
        if not hasattr(obj, "month"):
            obj.month = spend_this_month([obj.pk]).get(str(obj.pk), (ZERO, 0))
        return obj.month

    # -- columns -------------------------------------------------------------------------

    @admin.display(description="Keys")
    def keys(self, obj: Workspace) -> SafeString | str:
        total, active = obj.key_counts
        if not total:
            return muted("none")
        revoked = total - active
        label = f"{active:,} active" + (f", {revoked:,} revoked" if revoked else "")
        return format_html(
            '<a href="{}">{}</a>',
            console_url(APIKey, "changelist", query={"workspace": obj.pk}),
            label,
        )

    @admin.display(description="Spend this month (UTC)")
    def month_spend(self, obj: Workspace) -> SafeString:
        return money_cell(self._month(obj)[0])

    @admin.display(description="Requests this month")
    def month_requests(self, obj: Workspace) -> str:
        return f"{self._month(obj)[1]:,}"

    @admin.display(description="Ceiling (every provider)")
    def ceiling(self, obj: Workspace) -> SafeString:
        if obj.cap is None:
            return muted("none")
        return ceiling_bar(obj.cap, timezone.now())

    @admin.display(description="Ceilings on this workspace")
    def ceilings_table(self, obj: Workspace) -> SafeString:
        return ceilings_table(Ceiling.Scope.WORKSPACE, obj.pk)

    @admin.display(description="Keys")
    def keys_table(self, obj: Workspace) -> SafeString:
        keys = APIKey.objects.filter(workspace_keys(obj.pk)).select_related("user")
        return render_to_string(
            "admin/budgets/workspace/keys_table.html",
            {
                "keys": list(keys.order_by("-created_at")[:WORKSPACE_KEYS_SHOWN]),
                "total": keys.count(),
                "all_url": console_url(APIKey, "changelist", query={"workspace": obj.pk}),
            },
        )

    # -- saving through the services -------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: Workspace, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        if change:
            changes = {name: data[name] for name in form.changed_data if name in form.fields}
            saved = tenancy.workspace_update(workspace_id=obj.pk, **changes)
        else:
            saved = tenancy.workspace_create(name=data["name"], description=data["description"])
        self.adopt(obj, saved)

    def delete_through_service(self, obj: Workspace) -> None:
        tenancy.workspace_delete(workspace_id=obj.pk)
