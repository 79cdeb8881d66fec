"""The console's spend reports: spend per user, per model or per budget for a month or
a range of UTC days, as a table with totals and as CSV (budgets.admin_site routes it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from common.exports import csv_lines
from usage.selectors import REPORT_DIMENSIONS, ReportRow, month_window, spend_report


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive
    label: str
    month: str = ""
    date_from: str = ""
    date_to: str = ""


def period_from(request: HttpRequest, now: datetime) -> tuple[Period, str]:
    """The month (`?month=2026-11`) or the days (`?date_from=...&date_to=...`, both
    included, UTC) asked for; this month by default. Returns the period and an error
    message ("" when the input was good)."""
    get = request.GET
    try:
        if get.get("date_from") or get.get("date_to"):
            first = date.fromisoformat(get.get("date_from") or get["date_to"])
            last = date.fromisoformat(get.get("date_to") or get["date_from"])
            if last < first:
                raise ValueError("the end is before the start")
            start = datetime.combine(first, time.min, tzinfo=UTC)
            end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=UTC)
            return (
                Period(
                    start,
                    end,
                    f"{first:%d %b %Y} to {last:%d %b %Y} (UTC)",
                    "",
                    str(first),
                    str(last),
                ),
                "",
            )
        month = get.get("month") or f"{now:%Y-%m}"
        year, _, mon = month.partition("-")
        start = datetime(int(year), int(mon), 1, tzinfo=UTC)
    except (ValueError, KeyError):
        start, _ = month_window(now)
        error = "Dates are YYYY-MM-DD and months YYYY-MM, the end not before the start."
        return _month(start), error
    return _month(start), ""


def _month(start: datetime) -> Period:
    _, end = month_window(start)
    return Period(start, end, f"{start:%B %Y} (UTC)", month=f"{start:%Y-%m}")


def _totals(rows: list[ReportRow]) -> dict[str, int | Decimal]:
    return {
        "requests": sum(r.requests for r in rows),
        "failed": sum(r.failed for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "cost_usd": sum((r.cost_usd for r in rows), Decimal(0)),
    }


def spend_report_view(request: HttpRequest, *, site_context: dict) -> HttpResponse:
    if not request.user.has_perm("usage.view_usagelog"):
        raise PermissionDenied
    by = request.GET.get("by", "user")
    if by not in REPORT_DIMENSIONS:
        by = "user"
    now = timezone.now()
    period, error = period_from(request, now)
    rows = spend_report(by=by, start=period.start, end=period.end)
    totals = _totals(rows)
    if request.GET.get("format") == "csv":
        header = [
            by,
            "name",
            "requests",
            "failed",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ]
        lines = csv_lines(
            header,
            [
                (
                    r.key,
                    r.label,
                    r.requests,
                    r.failed,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd,
                )
                for r in rows
            ]
            + [("TOTAL", "", *totals.values())],
        )
        response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
        stamp = period.month or f"{period.date_from}_{period.date_to}"
        response["Content-Disposition"] = f'attachment; filename="spend-by-{by}-{stamp}.csv"'
        response["Cache-Control"] = "no-store"
        return response
    months, month = [], now.astimezone(UTC).date().replace(day=1)
    for _ in range(13):
        months.append(f"{month:%Y-%m}")
        month = (month - timedelta(days=1)).replace(day=1)
    context = {
        **site_context,
        "title": f"Spend by {by}, {period.label}",
        "by": by,
        "dimensions": REPORT_DIMENSIONS,
        "period": period,
        "error": error,
        "rows": rows,
        "totals": totals,
        "months": months,
        "query": request.GET.urlencode(),
    }
    return TemplateResponse(request, "admin/otari/spend_report.html", context)
