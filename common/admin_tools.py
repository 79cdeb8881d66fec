"""Building blocks shared by the budget console's ModelAdmins (budgets/admin/,
usage/admin.py): money display and validation, service-backed saving, read-only ledgers,
streamed CSV export, and changelists that stay fast on millions of rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from itertools import islice
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters, csrf_protect_m
from django.contrib.admin.utils import quote
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db import connections
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString

from common.exceptions import GatewayError
from common.exports import csv_lines
from common.fields import MoneyField

# Re-exported: the console modules import their display helpers from here.
from common.money import format_price as format_price
from common.money import format_usd, format_usd_exact

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from django.db.models import QuerySet

ZERO = Decimal("0")
NEAR_LIMIT = Decimal("0.8")


# ---------------------------------------------------------------------------------------
# Money on screen


def money(amount: Decimal | None) -> SafeString:
    """An amount in a list or panel: `format_usd`, with the exact figure on hover when
    the display rounded it."""
    shown, exact = format_usd(amount), format_usd_exact(amount)
    if amount is None or shown == exact:
        return format_html('<span class="otari-money">{}</span>', shown)
    return format_html('<span class="otari-money" title="{} exactly">{}</span>', exact, shown)


def usage_level(committed: Decimal, limit: Decimal | None) -> str:
    """ "ok" below 80% of the limit, "near" from 80%, "over" when admission would refuse
    (spend + reserved >= limit, docs/SPEC.md §3.3), "uncapped" without a limit."""
    if limit is None:
        return "uncapped"
    if committed >= limit:
        return "over"
    if committed >= limit * NEAR_LIMIT:
        return "near"
    return "ok"


def _percent(part: Decimal, whole: Decimal) -> Decimal:
    if whole <= 0:
        return Decimal(100) if part > 0 else ZERO
    return min(Decimal(100), part * 100 / whole)


def usage_bar(
    *,
    spend: Decimal,
    reserved: Decimal,
    limit: Decimal | None,
    refused_at: datetime | None = None,
) -> SafeString:
    """A bar of spend (solid) and reserved (hatched) against the limit, with the
    percentage and a tooltip giving the exact amounts. A user refused for budget in this
    window (`refused_at`) is shown as over it, whatever share it has spent: the requests
    it makes do not fit."""
    if limit is None:
        return format_html(
            '<span class="otari-muted" title="Spend {}; no limit">uncapped</span>',
            format_usd(spend),
        )
    committed = spend + reserved
    level = "over" if refused_at is not None else usage_level(committed, limit)
    spend_pct = _percent(spend, limit)
    reserved_pct = min(Decimal(100) - spend_pct, _percent(reserved, limit))
    shown = Decimal(100) if limit <= 0 else committed * 100 / limit
    return format_html(
        '<span class="otari-usage otari-usage--{level}" title="{title}">'
        '<span class="otari-bar" role="img" aria-label="{pct}% of the limit used">'
        '<span class="otari-bar__spend" style="width:{spend_w}%"></span>'
        '<span class="otari-bar__reserved" style="width:{reserved_w}%"></span>'
        '</span><span class="otari-usage__pct">{pct}%</span>{refused}</span>',
        level=level,
        title=(
            f"Spend {format_usd(spend)} + reserved {format_usd(reserved)} of {format_usd(limit)}"
            + (f"; refused for budget at {as_utc(refused_at)}" if refused_at else "")
        ),
        spend_w=f"{spend_pct:.1f}",
        reserved_w=f"{reserved_pct:.1f}",
        pct=f"{shown:.0f}",
        refused=(
            format_html('<span class="otari-usage__refused">{}</span>', "refused")
            if refused_at is not None
            else ""
        ),
    )


def key_display(key: Any) -> str:
    """`gw-AbCdEfG…wxyz`: enough to recognise a key, never enough to use it."""
    return f"{key.key_prefix}…{key.key_suffix}" if key.key_suffix else f"{key.key_prefix}…"


def badge(tone: str, label: str) -> SafeString:
    return format_html('<span class="otari-badge otari-badge--{}">{}</span>', tone, label)


def key_state(key: Any) -> SafeString:
    if not key.is_active:
        return badge("muted", "revoked")
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return badge("bad", "expired")
    return badge("good", "active")


def status_badge(status: str, status_code: int | None) -> SafeString:
    """A usage row's outcome: green success, red error, amber client disconnect."""
    tone = {"success": "good", "error": "bad"}.get(status, "warn")
    label = status.replace("_", " ")
    if status_code:
        label = f"{label} · {status_code}"
    return badge(tone, label)


class MoneyFormField(forms.DecimalField):
    """A USD amount in a form: shown as `3.50`, never as the stored `3.5000000000` or
    `0E-10`, and validated like every money column."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, Decimal) and value.is_finite():
            text = f"{value:f}"
            if "." in text:
                whole, fraction = text.split(".")
                fraction = fraction.rstrip("0").ljust(2, "0")
                text = f"{whole}.{fraction}"
            return text
        return value


# Every money field in a console form: no negatives, no more than the column's digits and
# places, no more than the largest amount docs/SPEC.md §3.1 allows, each with its own plain message.
MONEY_FORMFIELD_OVERRIDES: dict[type, dict[str, Any]] = {
    MoneyField: {
        "form_class": MoneyFormField,
        "min_value": ZERO,
        "max_value": settings.MONEY_MAX_USD,
        "error_messages": {
            "min_value": "Amounts cannot be negative.",
            "max_value": "Amounts cannot exceed $999,999,999,999.",
            "max_decimal_places": "Use at most %(max)s decimal places.",
            "max_digits": "Use at most %(max)s digits in total.",
            "max_whole_digits": "Use at most %(max)s digits before the decimal point.",
            "invalid": "Enter an amount in US dollars, such as 25 or 0.50.",
        },
    },
}


# ---------------------------------------------------------------------------------------
# ModelAdmins whose writes go through services


class ServiceAdmin(admin.ModelAdmin):
    """A ModelAdmin whose save_model/delete_model call services.

    Django wraps its add/change and delete views in `transaction.atomic()`. The services
    open their own durable transactions (they must really commit, and they raise when
    nested), so these views run without the outer block: each service call is the unit
    of work, exactly as when the API or a command calls it.
    """

    formfield_overrides = MONEY_FORMFIELD_OVERRIDES

    @csrf_protect_m
    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        return self._changeform_view(request, object_id, form_url, extra_context)

    @csrf_protect_m
    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return self._delete_view(request, object_id, extra_context)

    @staticmethod
    def adopt(obj: Any, saved: Any) -> None:
        """Make the form's unsaved instance the row the service wrote, so the admin's
        log entry, messages and redirect name the right object."""
        obj.pk = saved.pk
        obj.refresh_from_db()
        obj._state.adding = False


class DeleteRefused(Exception):
    """A service refused to delete an object (RefusableDeleteMixin); `message` says why,
    in the service's words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RefusableDeleteMixin:
    """Delete pages of objects whose service may refuse (a workspace still holding keys):
    delete_model raises DeleteRefused with the service's message, which is shown on the
    object's page instead of a success, and nothing is logged as deleted.

    The confirmation lists only the object: Django's own collection would walk every
    protected usage row (millions) and refuse with its own words. Bulk deletion is off,
    so that each refusal is reported for its object.
    """

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        return [str(o) for o in objs], {self.opts.verbose_name_plural: len(objs)}, set(), []

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def log_deletions(self, request: HttpRequest, queryset: Any) -> None:
        # Logged by delete_view once the service has deleted the row: it may refuse.
        pass

    @csrf_protect_m
    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except DeleteRefused as refused:
            self.message_user(request, refused.message, messages.ERROR)
            opts = self.opts
            return HttpResponseRedirect(
                reverse(
                    f"admin:{opts.app_label}_{opts.model_name}_change",
                    args=[quote(object_id)],
                    current_app=self.admin_site.name,
                )
            )

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        try:
            self.delete_through_service(obj)
        except GatewayError as refused:
            raise DeleteRefused(refused.message) from refused
        admin.ModelAdmin.log_deletions(self, request, [obj])

    def delete_through_service(self, obj: Any) -> None:
        """Delete `obj` through its service, which raises a GatewayError to refuse."""
        raise NotImplementedError


class PageRowsMixin:
    """A changelist whose rows show figures computed for the whole page at once (one
    grouped query over the shown rows, not one per row, and no correlated subquery per
    row): `page_rows(request, rows)` gets the page's objects before they are rendered."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type:
        base = super().get_changelist(request, **kwargs)
        model_admin = self

        class PageChangeList(base):
            def get_results(self, request: HttpRequest) -> None:
                super().get_results(request)
                # Evaluates the page's queryset once; the template iterates these objects.
                model_admin.page_rows(request, list(self.result_list))

        return PageChangeList

    def page_rows(self, request: HttpRequest, rows: list[Any]) -> None:
        raise NotImplementedError


class LedgerAdmin(admin.ModelAdmin):
    """History: viewable by those with the view permission, never added to, changed or
    deleted by anyone (superusers included), whatever is POSTed."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# ---------------------------------------------------------------------------------------
# Large changelists


def planner_row_estimate(queryset: QuerySet) -> int:
    """PostgreSQL's estimate of how many rows `queryset` returns (no rows are read)."""
    sql, params = queryset.order_by().query.sql_with_params()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class EstimatedCountPaginator(Paginator):
    """Counts exactly when few rows match, and uses the planner's estimate when many do.

    Counting a million rows reads a million rows on every page view; the estimate costs
    one EXPLAIN. The result count then reads "about N" (templates/admin/pagination.html).
    """

    exact_count_limit = 10_000
    is_estimate = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if connections[queryset.db].vendor == "postgresql":
            estimate = planner_row_estimate(queryset)
            if estimate > self.exact_count_limit:
                self.is_estimate = True
                return estimate
        return super().count


class InputFilter(admin.SimpleListFilter):
    """A free-text list filter (an exact value typed in), for columns with too many
    distinct values to list, such as the users or models of a million usage rows."""

    template = "admin/otari/input_filter.html"
    # A source of suggestions while typing (budgets.admin_site.OtariAdminSite.suggest_view):
    # "users", "models" or "keys"; empty for none.
    suggest = ""
    placeholder = ""

    @property
    def suggest_url(self) -> str:
        return reverse("admin:otari_suggest", args=[self.suggest]) if self.suggest else ""

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        # A placeholder: SimpleListFilter only renders when it has lookups.
        return [("", "")]

    def choices(self, changelist: Any) -> Iterator[dict[str, Any]]:
        others = [
            (name, value)
            for name, values in changelist.get_filters_params().items()
            if name != self.parameter_name
            for value in (values if isinstance(values, list) else [values])
        ]
        yield {
            "value": self.value() or "",
            "other_params": others,
            "clear_query_string": changelist.get_query_string(remove=[self.parameter_name]),
        }


class UserIdFilter(InputFilter):
    title = "user"
    parameter_name = "user"
    suggest = "users"
    placeholder = "user id or alias"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(user_id=self.value())
        return queryset


class DateRangeFilter(admin.ListFilter):
    """From one UTC day to another, both included (`?date_from=2026-11-01&date_to=
    2026-11-30`), on `date_field`: a range on its index, never a scan. Either end may be
    left open; a date that does not parse is refused like any bad filter (`?e=1`)."""

    title = "dates (UTC)"
    template = "admin/otari/date_range_filter.html"
    date_field = "timestamp"
    parameters = ("date_from", "date_to")

    def __init__(self, request: HttpRequest, params: dict, model: Any, model_admin: Any) -> None:
        super().__init__(request, params, model, model_admin)
        self.values: dict[str, str] = {}
        for name in self.parameters:
            if name in params:
                value = params.pop(name)
                self.values[name] = (value[-1] if isinstance(value, list) else value).strip()

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str]:
        return list(self.parameters)

    def bounds(self) -> tuple[datetime | None, datetime | None]:
        """The half-open range [start, end) the chosen days cover, in UTC."""
        try:
            first = (
                date.fromisoformat(self.values["date_from"])
                if self.values.get("date_from")
                else None
            )
            last = (
                date.fromisoformat(self.values["date_to"]) if self.values.get("date_to") else None
            )
        except ValueError as exc:
            raise IncorrectLookupParameters(str(exc)) from exc
        start = datetime.combine(first, time.min, tzinfo=UTC) if first else None
        end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=UTC) if last else None
        return start, end

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        start, end = self.bounds()
        if start is not None:
            queryset = queryset.filter(**{f"{self.date_field}__gte": start})
        if end is not None:
            queryset = queryset.filter(**{f"{self.date_field}__lt": end})
        return queryset

    def choices(self, changelist: Any) -> Iterator[dict[str, Any]]:
        others = [
            (name, value)
            for name, values in changelist.get_filters_params().items()
            if name not in self.parameters
            for value in (values if isinstance(values, list) else [values])
        ]
        yield {
            "date_from": self.values.get("date_from", ""),
            "date_to": self.values.get("date_to", ""),
            "other_params": others,
            "clear_query_string": changelist.get_query_string(remove=list(self.parameters)),
        }


# ---------------------------------------------------------------------------------------
# CSV export of a changelist


class CsvExportMixin:
    """An "Export CSV" button on the changelist that streams the filtered, ordered rows.

    Subclasses set `csv_columns`: (header, field path for values_list) pairs. Rows are
    read with a server-side cursor (`iterator(chunk_size=...)`) and written line by line
    through common.exports.csv_lines (formula prefixes escaped), so a million rows never
    sit in memory. Under ASGI the lines are produced by an async generator, since Django
    would otherwise read a sync iterator to the end before sending anything.
    """

    csv_columns: tuple[tuple[str, str], ...] = ()
    csv_filename = "export"
    csv_chunk_size = 2000
    change_list_template = "admin/otari/change_list.html"

    def get_urls(self) -> list:
        opts = self.model._meta
        export = path(
            "export.csv",
            self.admin_site.admin_view(self.export_csv_view),
            name=f"{opts.app_label}_{opts.model_name}_export_csv",
        )
        return [export, *super().get_urls()]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type:
        changelist = super().get_changelist(request, **kwargs)
        if getattr(request, "_otari_queryset_only", False):
            # The export (and the usage log's totals) need the changelist's filtered,
            # ordered queryset, not a page of results: skip the count and the page query.
            return type("ExportChangeList", (changelist,), {"get_results": _no_results})
        return changelist

    def export_csv_view(self, request: HttpRequest) -> StreamingHttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        request._otari_queryset_only = True
        changelist = self.get_changelist_instance(request)
        paths = [field_path for _, field_path in self.csv_columns]
        rows = changelist.queryset.values_list(*paths).iterator(chunk_size=self.csv_chunk_size)
        lines = csv_lines([header for header, _ in self.csv_columns], rows)
        if isinstance(request, ASGIRequest):
            content: Any = _lines_async(lines, batch=self.csv_chunk_size)
        else:
            content = lines
        response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="{self.csv_filename}-{stamp}.csv"'
        response["Cache-Control"] = "no-store"
        return response


def _no_results(self: Any, request: HttpRequest) -> None:
    return None


async def _lines_async(lines: Iterator[str], *, batch: int) -> AsyncIterator[str]:
    """Pull `lines` a batch at a time in the request's sync thread (thread-sensitive: the
    server-side cursor lives on that thread's connection), yielding between batches."""
    take = sync_to_async(lambda: "".join(islice(lines, batch)), thread_sensitive=True)
    while chunk := await take():
        yield chunk


def as_utc(moment: datetime | None, *, zone: bool = True) -> str:
    """A timestamp for the console: UTC, to the minute (`zone=False` where the column
    header already says UTC)."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M" + (" UTC" if zone else ""))
