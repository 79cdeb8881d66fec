"""The budget console's admin site: Django's admin, with the spend dashboard as its index.

The dashboard is a fixed number of aggregate queries (one per panel), whatever the size
of the usage table, and shows each panel only to staff allowed to view what it is made
of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from budgets.models import GatewayUser
from budgets.selectors import (
    OpenHolds,
    holds_open_summary,
    users_near_budget,
    users_refused_for_budget,
)
from otari.admin_tools import format_usd_brief
from otari.charts import BarChart, ShareRow, daily_spend_chart, share_rows
from usage.models import UsageLog
from usage.selectors import (
    spend_by_day,
    spend_top_models,
    spend_top_users,
    usage_recent_errors,
)

DASHBOARD_DAYS = 30
NEAR_BUDGET_SHOWN = 10


@dataclass(frozen=True)
class Dashboard:
    chart: BarChart | None = None
    spend_today: str = ""
    spend_window: str = ""
    requests_window: int = 0
    errors_window: int = 0
    top_users: list[ShareRow] | None = None
    top_models: list[ShareRow] | None = None
    near_budget: list[GatewayUser] | None = None
    # Refused for budget in the last 24 hours, most recent first (at most NEAR_BUDGET_SHOWN).
    refused_budget: list[GatewayUser] | None = None
    holds: OpenHolds | None = None
    recent_errors: list[UsageLog] | None = None

    @property
    def error_rate(self) -> str:
        if not self.requests_window:
            return "—"
        return f"{self.errors_window * 100 / self.requests_window:.1f}%"


def dashboard_build(request: HttpRequest) -> Dashboard | None:
    """The panels this staff user may see; None when they may see none."""
    user = request.user
    sees_usage = user.has_perm("usage.view_usagelog")
    sees_users = user.has_perm("budgets.view_gatewayuser")
    sees_holds = user.has_perm("budgets.view_hold")
    if not (sees_usage or sees_users or sees_holds):
        return None
    now = timezone.now()
    fields: dict[str, Any] = {}
    if sees_usage:
        days = spend_by_day(now=now, days=DASHBOARD_DAYS)
        chart = daily_spend_chart(days)
        fields.update(
            chart=chart,
            spend_today=format_usd_brief(days[-1].spend_usd),
            spend_window=format_usd_brief(chart.total_usd),
            requests_window=sum(d.requests for d in days),
            errors_window=sum(d.errors for d in days),
            top_models=share_rows(spend_top_models(now=now, days=DASHBOARD_DAYS)),
            recent_errors=usage_recent_errors(),
        )
        if sees_users:
            fields["top_users"] = share_rows(spend_top_users(now=now, days=DASHBOARD_DAYS))
    if sees_users:
        fields["near_budget"] = list(users_near_budget(now=now)[:NEAR_BUDGET_SHOWN])
        fields["refused_budget"] = list(users_refused_for_budget(now=now)[:NEAR_BUDGET_SHOWN])
    if sees_holds:
        fields["holds"] = holds_open_summary(now=now)
    return Dashboard(**fields)


class OtariAdminSite(admin.AdminSite):
    site_header = "Otari budget console"
    site_title = "Otari console"
    index_title = "Spend dashboard"
    # The gateway has no public site to link to.
    site_url = None

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {"dashboard": dashboard_build(request), **(extra_context or {})}
        return super().index(request, context)
