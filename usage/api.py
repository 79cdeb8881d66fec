"""Management API for prices and the usage log (docs/SPEC.md §6), master key only.

Thin views over usage.selectors and usage.services; served under `/v1/` and `/api/v1/`.
Usage time filters are half-open (`start_date <= timestamp < end_date`), accept ISO 8601
or Unix epoch seconds, and read a naive time as UTC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common.exceptions import NotFound
from common.exports import csv_lines
from common.rest import (
    PAGE_PARAMETERS,
    ManagementMixin,
    Unprocessable,
    error_responses,
    json_number,
    page_params,
    quoted_id,
    validated,
)
from usage import selectors, services
from usage.serializers import (
    AsOfQuery,
    EffectiveAtQuery,
    PricingResponse,
    SetPricing,
    UsageCount,
    UsageEntry,
    UsageFilterQuery,
    UsageSummary,
    UsageSummaryQuery,
)

# The default window of a summary that names no start.
SUMMARY_DEFAULT_DAYS = 30


def _datetime_parameter(name: str, description: str) -> OpenApiParameter:
    return OpenApiParameter(
        name,
        {"type": "string", "maxLength": 64},
        description=description + " ISO 8601 or Unix epoch seconds; naive = UTC.",
    )


def _list_parameter(name: str, description: str, **items: Any) -> OpenApiParameter:
    return OpenApiParameter(
        name,
        {"type": "array", "items": {"type": "string", **items}, "maxItems": 50},
        description=description + " Repeatable; matches any.",
        explode=True,
    )


FILTER_PARAMETERS = [
    _datetime_parameter("start_date", "Rows with timestamp >= start_date."),
    _datetime_parameter("end_date", "Rows with timestamp < end_date."),
    _list_parameter("user_id", "User ids.", maxLength=255),
    _list_parameter("model", "Models as logged (the provider's model name).", maxLength=255),
    _list_parameter("api_key_id", "API key ids.", format="uuid"),
    OpenApiParameter(
        "endpoint", {"type": "string", "maxLength": 64}, description="e.g. /v1/chat/completions"
    ),
    OpenApiParameter(
        "status", {"type": "string", "enum": ["success", "error", "client_disconnected"]}
    ),
    OpenApiParameter("provider", {"type": "string", "maxLength": 100}),
    OpenApiParameter("status_code", {"type": "integer", "minimum": 100, "maximum": 599}),
    OpenApiParameter("counts_toward_budget", OpenApiTypes.BOOL),
]


def _filters(query: dict[str, Any]) -> selectors.UsageFilters:
    return selectors.UsageFilters(
        start=query.get("start_date"),
        end=query.get("end_date"),
        user_ids=query.get("user_id") or [],
        models=query.get("model") or [],
        api_key_ids=query.get("api_key_id") or [],
        endpoint=query.get("endpoint"),
        status=query.get("status"),
        provider=query.get("provider"),
        status_code=query.get("status_code"),
        counts_toward_budget=query.get("counts_toward_budget"),
    )


# ---------------------------------------------------------------------------------------
# Pricing


class PricingListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="pricing_list",
        tags=["pricing"],
        parameters=PAGE_PARAMETERS,
        description="The price in effect now of every priced model, by model key. "
        "Scheduled (future) versions show in each model's history.",
        responses={200: PricingResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        prices = selectors.pricing_list_current(now=timezone.now(), skip=skip, limit=limit)
        return Response(PricingResponse(prices, many=True).data)

    @extend_schema(
        operation_id="pricing_set",
        tags=["pricing"],
        request=SetPricing,
        description="Adds a price version in effect from `effective_at` (default now). "
        "Requests are priced as of their own time, so past costs never change. Setting "
        "the same model and instant twice replaces that version.",
        responses={200: PricingResponse, **error_responses(422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(SetPricing, request.data)
        if data.get("cache_write_1h_price_per_million") is not None:
            raise Unprocessable("cache_write_1h_price_per_million: Not supported; send null.")
        if data.get("pricing_tiers"):
            raise Unprocessable("pricing_tiers: Not supported; send null or [].")
        price = services.pricing_set(
            model_key=data["model_key"],
            input_per_mtok=data["input_price_per_million"],
            output_per_mtok=data["output_price_per_million"],
            cache_read_per_mtok=data.get("cache_read_price_per_million"),
            cache_write_per_mtok=data.get("cache_write_price_per_million"),
            effective_at=data.get("effective_at"),
        )
        return Response(PricingResponse(price).data)


class PricingDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="pricing_get",
        tags=["pricing"],
        parameters=[_datetime_parameter("as_of", "The instant to look up (default now).")],
        responses={200: PricingResponse, **error_responses(404, 422)},
    )
    def get(self, request: Request, model_key: str) -> Response:
        query = validated(AsOfQuery, request.query_params)
        price = selectors.price_at(model_key, query.get("as_of") or timezone.now())
        if price is None:
            raise NotFound(f"No price for model {quoted_id(model_key)}", code="price_not_found")
        return Response(PricingResponse(price).data)

    @extend_schema(
        operation_id="pricing_delete",
        tags=["pricing"],
        parameters=[
            _datetime_parameter("effective_at", "Delete only the version from this instant.")
        ],
        description="Deletes every version of the model's price, or the one named by "
        "effective_at. Usage rows keep the cost they were charged.",
        responses={204: None, **error_responses(404, 422)},
    )
    def delete(self, request: Request, model_key: str) -> Response:
        query = validated(EffectiveAtQuery, request.query_params)
        if not services.pricing_delete(model_key=model_key, effective_at=query.get("effective_at")):
            raise NotFound(f"No price for model {quoted_id(model_key)}", code="price_not_found")
        return Response(status=204)


class PricingHistoryApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="pricing_history",
        tags=["pricing"],
        description="Every version of the model's price, newest effective_at first.",
        responses={200: PricingResponse(many=True), **error_responses(404)},
    )
    def get(self, request: Request, model_key: str) -> Response:
        history = selectors.pricing_history(model_key=model_key)
        if not history:
            raise NotFound(f"No price for model {quoted_id(model_key)}", code="price_not_found")
        return Response(PricingResponse(history, many=True).data)


# ---------------------------------------------------------------------------------------
# Usage


class UsageListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="usage_list",
        tags=["usage"],
        parameters=[*FILTER_PARAMETERS, *PAGE_PARAMETERS],
        description="Usage rows, newest first.",
        responses={200: UsageEntry(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        filters = _filters(validated(UsageFilterQuery, request.query_params))
        rows = selectors.usage_list(filters=filters, skip=skip, limit=limit)
        return Response(UsageEntry(rows, many=True).data)


class UsageCountApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="usage_count",
        tags=["usage"],
        parameters=FILTER_PARAMETERS,
        responses={200: UsageCount, **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        filters = _filters(validated(UsageFilterQuery, request.query_params))
        return Response({"total": selectors.usage_count(filters=filters)})


def _summary_window(query: dict[str, Any]) -> tuple[datetime, datetime]:
    end = query.get("end_date") or timezone.now()
    start = query.get("start_date") or end - timedelta(days=SUMMARY_DEFAULT_DAYS)
    return start, end


class UsageSummaryApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="usage_summary",
        tags=["usage"],
        parameters=[
            *FILTER_PARAMETERS,
            OpenApiParameter("bucket", {"type": "string", "enum": ["day", "hour"]}),
            OpenApiParameter(
                "dimensions",
                {
                    "type": "array",
                    "items": {
                        "type": "string",
                        "enum": [*selectors.DIMENSIONS, "none"],
                    },
                    "maxItems": 10,
                },
                description="Breakdowns to compute (default all; 'none' for totals and "
                "series only). Repeatable.",
                explode=True,
            ),
        ],
        description="Totals, breakdowns by user/model/provider/endpoint/key/status code "
        f"(top {selectors.GROUP_LIMIT}, the rest folded into an is_other row) and a daily "
        f"or hourly series. Default window: the last {SUMMARY_DEFAULT_DAYS} days.",
        responses={200: UsageSummary, **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        query = validated(UsageSummaryQuery, request.query_params)
        start, end = _summary_window(query)
        if start > end:
            raise Unprocessable("start_date: Must not be after end_date.")
        filters = _filters({**query, "start_date": start, "end_date": end})
        requested = query.get("dimensions") or list(selectors.DIMENSIONS)
        dimensions = () if "none" in requested else tuple(requested)
        summary = selectors.usage_summary(
            filters=filters, bucket=query["bucket"], dimensions=dimensions
        )
        summary.update(start_date=start, end_date=end)
        return Response(UsageSummary(summary).data)


def _take(lines: Iterator[str], count: int) -> list[str]:
    chunk = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= count:
            break
    return chunk


async def _csv_stream(filters: selectors.UsageFilters) -> AsyncIterator[str]:
    """The CSV, a few hundred lines at a time. Django serves an async iterator as it
    goes under ASGI (a sync one would be read whole first); the database is read in a
    thread, in chunks, from one cursor."""
    rows = (
        (day, user_id, model, *counts[:-1], json_number(counts[-1]))
        for day, user_id, model, *counts in selectors.usage_summary_rows(filters=filters)
    )
    lines = csv_lines(selectors.USAGE_CSV_HEADER, rows)
    while chunk := await sync_to_async(_take, thread_sensitive=True)(lines, 500):
        yield "".join(chunk)


class UsageSummaryCsvApi(ManagementMixin, APIView):
    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # The body is CSV whatever the Accept header says; errors are JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="usage_summary_csv",
        tags=["usage"],
        parameters=FILTER_PARAMETERS,
        description="Totals per UTC day, user and model as CSV (date, user_id, model, "
        "requests, errors, prompt_tokens, completion_tokens, total_tokens, cost_usd), "
        "streamed. Cells that a spreadsheet would run as a formula are prefixed with '. "
        f"Default window: the last {SUMMARY_DEFAULT_DAYS} days.",
        responses={
            (200, "text/csv"): OpenApiResponse(response=OpenApiTypes.STR),
            **error_responses(422),
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        query = validated(UsageFilterQuery, request.query_params)
        start, end = _summary_window(query)
        if start > end:
            raise Unprocessable("start_date: Must not be after end_date.")
        filters = _filters({**query, "start_date": start, "end_date": end})
        response = StreamingHttpResponse(
            _csv_stream(filters), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = (
            f'attachment; filename="usage-{start:%Y%m%d}-{end:%Y%m%d}.csv"'
        )
        return response
