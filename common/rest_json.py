"""The management API's JSON: Decimals in and out as exact JSON numbers.

Money is parsed from the JSON text as Decimal (never via float) and written back as a
JSON number with every digit (simplejson's use_decimal), so `spend` reads 0.000123, not
a string and not 0.00012299999. Kept apart from common/rest.py because DRF imports the
renderer and parser classes named in settings while it is itself being imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import simplejson
from django.conf import settings
from rest_framework import exceptions, parsers, renderers
from rest_framework.utils.encoders import JSONEncoder as DRFJSONEncoder


class _FixedPointDecimal(Decimal):
    """A Decimal that prints without an exponent (0.0000001, not 1E-7)."""

    __slots__ = ()

    def __str__(self) -> str:
        return format(self, "f")


def json_number(value: Decimal | None) -> int | Decimal | None:
    """A Decimal as the JSON number it should print as: integral values as integers,
    the rest in fixed point with trailing zeros dropped, every digit kept."""
    if value is None:
        return None
    normal = value.normalize()
    if normal == normal.to_integral_value():
        return int(normal)
    return _FixedPointDecimal(normal)


_drf_default = DRFJSONEncoder().default


class JSONRenderer(renderers.JSONRenderer):
    """JSON with Decimals written as numbers, digit for digit."""

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        if data is None:
            return b""
        return simplejson.dumps(
            data,
            use_decimal=True,
            default=_drf_default,
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        ).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


class JSONParser(parsers.JSONParser):
    """JSON bodies with every number that has a fraction or exponent read as Decimal,
    straight from its text (never through a binary float)."""

    renderer_class = JSONRenderer

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding)
            data = simplejson.loads(
                text, parse_float=Decimal, parse_constant=_reject_constant, use_decimal=False
            )
        except (ValueError, UnicodeDecodeError, RecursionError):
            # The decoder's message quotes the offending text: say only what is wrong.
            raise exceptions.ParseError("Malformed JSON body") from None
        if not storable(data):
            raise exceptions.ValidationError(STORABLE_MESSAGE)
        return data


STORABLE_MESSAGE = "Text may not contain NUL characters or unpaired surrogates."


def text_storable(value: str) -> bool:
    """Whether PostgreSQL can store the text: valid JSON may carry \\u0000 and lone
    surrogates, which no text or jsonb column accepts."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def all_strings(data: Any, check: Callable[[str], bool]) -> bool:
    """Whether `check` holds for every key and string of a parsed JSON document
    (iterative: a deeply nested body must not exhaust the stack)."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not check(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def storable(data: Any) -> bool:
    """`text_storable` for every key and string of a parsed JSON document."""
    return all_strings(data, text_storable)
