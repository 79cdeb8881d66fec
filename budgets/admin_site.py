"""The budget console's admin site: Django's admin, with the spend dashboard as its index.

The dashboard is a fixed number of aggregate queries (one per panel), whatever the size
of the usage table, and shows each panel only to staff allowed to view what it is made
of.

It lives in budgets, not in the project package, because it reads both apps' selectors:
budgets may import usage, never the reverse. otari/apps.py names it as the admin's
default site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils import timezone

from budgets.models import DEFAULT_WORKSPACE_ID, GatewayUser
from budgets.selectors import (
    OpenHolds,
    holds_open_summary,
    users_near_budget,
    users_refused_for_budget,
)
from common.charts import BarChart, ShareRow, daily_spend_chart, share_rows
from common.login_throttle import ThrottledAdminAuthenticationForm
from common.money import format_usd
from usage.models import UsageLog
from usage.selectors import (
    month_window,
    spend_by_day,
    spend_per_workspace,
    spend_top_models,
    spend_top_users,
    suggest_keys,
    suggest_models,
    suggest_users,
    usage_recent_errors,
)

# Filter suggestions: what a staff user must be allowed to view, and where they come from.
SUGGESTION_SOURCES = {
    "users": ("budgets.view_gatewayuser", suggest_users),
    "models": ("usage.view_modelpricing", suggest_models),
    "keys": ("budgets.view_apikey", suggest_keys),
}

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
    # Spend per workspace this UTC calendar month, most first, and the month's name.
    workspace_spend: list[ShareRow] | None = None
    month_label: str = ""

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
            spend_today=format_usd(days[-1].spend_usd),
            spend_window=format_usd(chart.total_usd),
            requests_window=sum(d.requests for d in days),
            errors_window=sum(d.errors for d in days),
            top_models=share_rows(spend_top_models(now=now, days=DASHBOARD_DAYS)),
            recent_errors=usage_recent_errors(),
        )
        if sees_users:
            fields["top_users"] = share_rows(spend_top_users(now=now, days=DASHBOARD_DAYS))
        month_start, month_end = month_window(now)
        fields.update(
            workspace_spend=share_rows(
                spend_per_workspace(
                    start=month_start, end=month_end, default_workspace_id=DEFAULT_WORKSPACE_ID
                )
            ),
            month_label=f"{month_start:%B %Y}",
        )
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
    # Navigation runs across the top (templates/admin/base_site.html): Django's sidebar
    # takes 275 px, which on a 1366-px laptop left the usage log 717 px.
    enable_nav_sidebar = False
    # Failed logins are counted, logged and, past a limit, refused for a while
    # (common/login_throttle.py).
    login_form = ThrottledAdminAuthenticationForm

    # The sections in the order finance and operations people use them; anything not
    # named here (Django's own users and groups) follows.
    nav_order = (
        "usage.usagelog",
        "budgets.gatewayuser",
        "budgets.budget",
        "budgets.workspace",
        "budgets.ceiling",
        "budgets.apikey",
        "usage.modelpricing",
        "llm_proxy.routingpolicy",
        "llm_proxy.alias",
        "budgets.hold",
        "budgets.budgetresetlog",
        "budgets.budgetalert",
        "budgets.settingchange",
    )

    def get_urls(self) -> list:
        suggest = path(
            "suggest/<str:kind>/", self.admin_view(self.suggest_view), name="otari_suggest"
        )
        reports = path(
            "reports/spend/",
            self.admin_view(self.spend_report_view),
            name="otari_spend_report",
        )
        return [suggest, reports, *super().get_urls()]

    def spend_report_view(self, request: HttpRequest) -> HttpResponse:
        from usage.admin_reports import spend_report_view

        return spend_report_view(request, site_context=self.each_context(request))

    def suggest_view(self, request: HttpRequest, kind: str) -> JsonResponse:
        """Suggestions for the typed-in list filters (user, model, key), for staff allowed
        to view what is suggested. Reads small tables only, never the usage log."""
        source = SUGGESTION_SOURCES.get(kind)
        if source is None:
            raise Http404
        permission, suggest = source
        if not request.user.has_perm(permission):
            raise PermissionDenied
        term = request.GET.get("q", "").strip()[:100]
        return JsonResponse(
            {"results": [{"value": s.value, "label": s.label} for s in suggest(term)]}
        )

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        context = super().each_context(request)
        context["otari_nav"] = self._nav(context.get("available_apps") or [], request.path)
        context["otari_can_report"] = request.user.has_perm("usage.view_usagelog")
        return context

    def _nav(self, apps: list[dict[str, Any]], current: str) -> list[dict[str, Any]]:
        rank = {key: i for i, key in enumerate(self.nav_order)}
        entries = []
        for app in apps:
            for model in app["models"]:
                url = model.get("admin_url")
                if not url:
                    continue
                key = f"{app['app_label']}.{model['object_name'].lower()}"
                entries.append(
                    {
                        "name": model["name"],
                        "url": url,
                        "current": current.startswith(url),
                        "rank": rank.get(key, len(rank)),
                        "extra": key not in rank,
                    }
                )
        return sorted(entries, key=lambda e: (e["rank"], e["name"]))

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {"dashboard": dashboard_build(request), **(extra_context or {})}
        return super().index(request, context)
