"""The management API's generic plumbing: JSON with exact Decimals, the error shape,
strict fields and query parsing (docs/SPEC.md §6).

Shared by budgets/api.py and usage/api.py, so every management route validates, fails
and renders the same way. Who may call the API is not decided here: the master key is
the budgets app's (budgets/rest.py), and this package imports no app.

- Errors are `{"detail": "..."}`. Validation errors are 422 and name the field, never
  the value that was rejected (it may be a pasted secret, and echoing input is how
  reflection bugs start); ids in a URL path may be named, they are the caller's own URL.
- Money is parsed from the JSON text as Decimal (never via float) and written back as a
  JSON number with every digit (simplejson's use_decimal), so `spend` reads 0.000123,
  not a string and not 0.00012299999.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import IntegrityError
from django.http import Http404, JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema_field
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from common import pgpool
from common.credentials import API_KEY_PREFIX, MASTER_KEY_PREFIX
from common.exceptions import GatewayError, PayloadTooLarge, ServiceUnavailable
from common.rest_json import STORABLE_MESSAGE, json_number, text_storable

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# Offsets past this are refused (422) rather than passed to SQL, where an out-of-range
# integer would be a database error.
MAX_SKIP = 2_147_483_647


# ---------------------------------------------------------------------------------------
# Errors


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    if isinstance(detail, Mapping):
        out = []
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else f"{prefix}{key}"
            out.extend(_flatten(value, f"{name}." if name else ""))
        return out
    if isinstance(detail, Sequence) and not isinstance(detail, str):
        if all(isinstance(item, str) for item in detail):
            label = prefix.rstrip(".")
            return [f"{label}: {item}" if label else str(item) for item in detail]
        out = []
        for index, item in enumerate(detail):
            if item:
                out.extend(_flatten(item, f"{prefix}{index}."))
        return out
    label = prefix.rstrip(".")
    return [f"{label}: {detail}" if label else str(detail)]


def exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    """Every management error as `{"detail": "..."}` with the status codes of docs/SPEC.md §6."""
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    if isinstance(exc, GatewayError):
        return Response({"detail": exc.message}, status=exc.status, headers=exc.headers)
    if isinstance(exc, exceptions.ValidationError):
        return Response({"detail": "; ".join(_flatten(exc.detail)) or "Invalid input"}, 422)
    if isinstance(exc, Http404):
        return Response({"detail": "Not found"}, status=404)
    if isinstance(exc, IntegrityError):
        # A concurrent write won a uniqueness race the view had checked for.
        return Response({"detail": "Conflicts with an existing record"}, status=409)
    if isinstance(exc, pgpool.UNAVAILABLE):
        unavailable = ServiceUnavailable()
        return Response({"detail": unavailable.message}, status=503, headers=unavailable.headers)
    # Imported here: rest_framework.views reads the renderer settings at import time,
    # and they name common.rest_json, so a module-level import would be circular.
    from rest_framework.views import exception_handler as drf_exception_handler

    # Anything else that DRF does not know either goes on to Django, whose handler500
    # (otari/urls.py) answers every route's unhandled errors alike: logged once with the
    # request id, a JSON body that names the id and not the error.
    return drf_exception_handler(exc, context)


def page_not_found(request: Any, exception: Exception | None = None) -> JsonResponse:
    """Every unknown URL answers in the API's error shape, not an HTML page."""
    return JsonResponse({"detail": "Not found"}, status=404)


def validated(serializer_class: type[serializers.Serializer], data: Any, **kwargs: Any) -> Any:
    """The request body through `serializer_class`, or a 422 naming the fields."""
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class Unprocessable(GatewayError):
    """A well-formed request the API cannot act on (422), e.g. an unsupported setting."""

    status = 422
    code = "unprocessable"


# ---------------------------------------------------------------------------------------
# Strict fields: JSON types as the schema says, no coercion from strings or booleans


@extend_schema_field(
    {
        "type": "number",
        "minimum": 0,
        "maximum": 999999999999,
        "description": "USD, exact: read from the JSON text as a decimal, never a float.",
    }
)
class MoneyField(serializers.Field):
    """A USD amount: a JSON number, 0..999,999,999,999, at most ten decimal places."""

    default_error_messages = {
        "invalid": "Must be a number.",
        "range": "Must be between 0 and 999999999999.",
        "places": "Must have at most 10 decimal places.",
    }

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, int | Decimal):
            self.fail("invalid")
        try:
            amount = Decimal(data)
        except (InvalidOperation, ValueError):
            self.fail("invalid")
        if not amount.is_finite():
            self.fail("invalid")
        if amount < 0 or amount > settings.MONEY_MAX_USD:
            self.fail("range")
        if amount.as_tuple().exponent < -settings.MONEY_DECIMAL_PLACES:  # type: ignore[operator]
            normal = amount.normalize()
            if normal.as_tuple().exponent < -settings.MONEY_DECIMAL_PLACES:  # type: ignore[operator]
                self.fail("places")
            amount = normal
        return amount

    def to_representation(self, value: Decimal) -> int | Decimal | None:
        return json_number(value)


@extend_schema_field({"type": "number", "description": "USD, exact."})
class MoneyOutField(serializers.Field):
    """A computed amount, output only."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("read_only", True)
        super().__init__(**kwargs)

    def to_representation(self, value: Decimal) -> int | Decimal | None:
        return json_number(value)


class StrictCharField(serializers.CharField):
    """A JSON string (DRF's CharField would turn 5 into "5")."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """true or false (DRF's BooleanField would also take "yes" and 1)."""

    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer (not "5", not 5.0, not true)."""

    default_error_messages = {"invalid": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class ChoiceField(serializers.ChoiceField):
    """A choice whose error lists the options, not the rejected input."""

    def __init__(self, choices: Sequence[str], **kwargs: Any) -> None:
        kwargs.setdefault(
            "error_messages", {"invalid_choice": "Must be one of: " + ", ".join(choices) + "."}
        )
        super().__init__(choices, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid_choice")
        return super().to_internal_value(data)


class JSONObjectField(serializers.DictField):
    """A JSON object of anything, stored as JSON: its fractional numbers (parsed as
    Decimal) go back to JSON numbers, and one no float can hold is refused."""

    default_error_messages = {
        "not_a_dict": "Must be a JSON object.",
        "number": "Numbers must be finite doubles.",
    }

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value = super().to_internal_value(data)
        return self._plain(value)

    def _plain(self, value: Any) -> Any:
        if isinstance(value, Decimal):
            number = float(value)
            if not math.isfinite(number):
                self.fail("number")
            return number
        if isinstance(value, dict):
            return {key: self._plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._plain(item) for item in value]
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            # Beyond what jsonb can compare and clients can read back exactly.
            self.fail("number")
        return value


class ConstantField(serializers.Field):
    """An output field with a fixed value: settings this gateway does not have, reported
    as the SDK's models require them."""

    value: Any = None

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def get_attribute(self, instance: Any) -> Any:
        return self.value

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field({"type": "integer", "nullable": True})
class NullIntegerField(ConstantField):
    """Always null: e.g. request/token limits, which this gateway does not enforce."""


@extend_schema_field(OpenApiTypes.DATETIME)
class DateTimeField(serializers.DateTimeField):
    """ISO 8601 with an explicit UTC offset on output (`+00:00`); naive input is UTC."""

    default_error_messages = {"invalid": "Must be an ISO 8601 date-time."}

    def to_internal_value(self, value: Any) -> datetime:
        if not isinstance(value, str):
            self.fail("invalid")
        try:
            return super().to_internal_value(value)
        except (ValueError, OverflowError):
            self.fail("invalid")

    def to_representation(self, value: datetime | None) -> str | None:
        return iso(value)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def allowed_models_validate(entries: list[str] | None) -> list[str] | None:
    """Null (any model), [] (none) or `provider:model` / `provider:*` entries: an entry
    without a provider would silently match nothing, so it is refused."""
    if entries is None:
        return None
    for entry in entries:
        provider, sep, model = entry.partition(":")
        if not (sep and provider and model):
            raise serializers.ValidationError(
                "Entries must look like provider:model or provider:*."
            )
    return entries


def allowed_models_field(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(
        child=StrictCharField(max_length=255),
        allow_null=True,
        max_length=1000,
        validators=[allowed_models_validate],
        error_messages={"not_a_list": "Must be a list of strings or null."},
        **kwargs,
    )


# ---------------------------------------------------------------------------------------
# Query strings


class QueryDateTimeField(serializers.Field):
    """A query-string instant: ISO 8601 (a date alone means its midnight) or Unix epoch
    seconds; naive means UTC. A `+` in an offset that arrived as a space (an unencoded
    `+` in a URL) is read as `+`."""

    default_error_messages = {
        "invalid": "Must be an ISO 8601 date-time or Unix epoch seconds.",
    }

    def to_internal_value(self, data: Any) -> datetime:
        if not isinstance(data, str) or not data.strip() or len(data) > 64:
            self.fail("invalid")
        text = data.strip()
        try:
            if text.replace(".", "", 1).isdigit():
                return datetime.fromtimestamp(float(text), tz=UTC)
            if " " in text[10:] and "T" in text:
                text = text[:10] + text[10:].replace(" ", "+")
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except (ValueError, OverflowError, OSError):
            self.fail("invalid")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)

    def to_representation(self, value: datetime) -> str | None:
        return iso(value)


class PageQuerySerializer(serializers.Serializer):
    """`skip` >= 0 and `limit` 1..1000 (default 100); lists are bare JSON arrays."""

    skip = serializers.IntegerField(
        min_value=0,
        max_value=MAX_SKIP,
        default=0,
        error_messages={"invalid": "Must be an integer."},
    )
    limit = serializers.IntegerField(
        min_value=1,
        max_value=MAX_PAGE_SIZE,
        default=DEFAULT_PAGE_SIZE,
        error_messages={"invalid": "Must be an integer."},
    )


def page_params(request: Request) -> tuple[int, int]:
    """(skip, limit) from the query string, or a 422."""
    query = PageQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data["skip"], query.validated_data["limit"]


PAGE_PARAMETERS = [
    OpenApiParameter(
        "skip",
        {"type": "integer", "minimum": 0, "maximum": MAX_SKIP, "default": 0},
        description="Rows to skip.",
    ),
    OpenApiParameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
        description="Rows to return.",
    ),
]


def error_responses(*statuses: int) -> dict[int, Any]:
    """The `{"detail": ...}` error body, for the schema of each status a route returns."""
    from drf_spectacular.utils import OpenApiResponse

    return {
        status: OpenApiResponse(response=ErrorSerializer, description=_STATUS_TEXT[status])
        for status in statuses
    }


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


_STATUS_TEXT = {
    400: "Bad request",
    401: "Missing or invalid master key",
    403: "Not the master key",
    404: "Not found",
    409: "Conflict",
    415: "Unsupported media type",
    422: "Validation error",
    503: "Unavailable",
}


# ---------------------------------------------------------------------------------------
# Management views


class ManagementMixin:
    # A check that the ids in the path and the query string can be stored and compared
    # (no NUL, no lone surrogate). Who may call is settings' default (REST_FRAMEWORK:
    # the master key, budgets/rest.py). (A comment, not a docstring: the schema
    # generator would show a docstring as each operation's description.)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        values = [value for value in kwargs.values() if isinstance(value, str)]
        values.extend(value for _, items in request.query_params.lists() for value in items)
        if not all(text_storable(value) for value in values):
            raise Unprocessable(STORABLE_MESSAGE)


# Longest identifier quoted back in a 404 message.
_MAX_QUOTED_ID = 80


def quoted_id(value: str) -> str:
    """An identifier from the URL path, fit to quote in an error message: shortened, and
    withheld when it looks like a secret (someone pasting a key into the wrong place)."""
    if value.startswith((API_KEY_PREFIX, MASTER_KEY_PREFIX)):
        return "(withheld)"
    if len(value) > _MAX_QUOTED_ID:
        value = value[:_MAX_QUOTED_ID] + "…"
    return repr(value)
