"""Wire shapes of the routing management API (docs/ROUTING.md, docs/API.md "Routing"):
otari's `/v1/aliases` and `/v1/routing/policies` bodies. Serializers only check JSON
types (422); whether a name, target or spec can work is routing's rule
(llm_proxy.routing.spec, a 400 with its message), so it is written once, there.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from common.rest import DateTimeField, JSONObjectField, StrictCharField
from llm_proxy.models import NAME_MAX_LENGTH

SOURCES = ["config", "stored"]


def _name_field(**kwargs: Any) -> StrictCharField:
    # Any string up to the column's width: the routing rules (no ':' or '/', not a
    # provider's name) answer 400 with their reason, as otari does.
    return StrictCharField(max_length=NAME_MAX_LENGTH, trim_whitespace=False, **kwargs)


def _user_field(**kwargs: Any) -> StrictCharField:
    return StrictCharField(
        max_length=255,
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="The user it applies to alone; omit (or null) for every caller.",
        **kwargs,
    )


@extend_schema_field({"type": "number", "nullable": True})
class NumberField(serializers.Field):
    """A JSON number (not "80", not true), read as an exact Decimal."""

    default_error_messages = {"invalid": "Must be a number."}

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, int | float | Decimal):
            self.fail("invalid")
        try:
            number = Decimal(str(data))
        except InvalidOperation:
            self.fail("invalid")
        if not number.is_finite():
            self.fail("invalid")
        return number

    def to_representation(self, value: Decimal) -> Any:
        return value


# --- aliases -------------------------------------------------------------------------------


class AliasRequest(serializers.Serializer):
    name = _name_field(help_text="What callers send as `model`, e.g. 'fast'.")
    target = StrictCharField(max_length=NAME_MAX_LENGTH, help_text="`provider:model`.")
    user_id = _user_field()


class AliasResponse(serializers.Serializer):
    name = serializers.CharField()
    target = serializers.CharField()
    source = serializers.ChoiceField(
        SOURCES, help_text="`config` (OTARI_CONFIG, read-only here) or `stored`."
    )
    user_id = serializers.CharField(allow_null=True, help_text="null: every caller.")
    created_at = DateTimeField(allow_null=True)
    updated_at = DateTimeField(allow_null=True)


# --- policies ------------------------------------------------------------------------------


class PolicyRequest(serializers.Serializer):
    name = _name_field(help_text="What callers send as `model`, e.g. 'fast'.")
    spec = JSONObjectField(
        help_text="`select` (entries ending with one `default`) and `on_failure`: the "
        "same as a `routing.policies` entry in OTARI_CONFIG. Unknown keys are refused."
    )
    user_id = _user_field()
    rename_from = _name_field(
        required=False,
        allow_null=True,
        help_text="The stored policy (same scope) that becomes `name` with this spec, in one "
        "write; it must exist (404), and `name` must be free (409).",
    )


class PolicyResponse(serializers.Serializer):
    name = serializers.CharField()
    spec = serializers.DictField(help_text="Normalised: key order stable, plain numbers.")
    source = serializers.ChoiceField(SOURCES)
    user_id = serializers.CharField(allow_null=True)
    is_dynamic = serializers.BooleanField(
        help_text="True when the target depends on the request (a condition or a router)."
    )
    created_at = DateTimeField(allow_null=True)
    updated_at = DateTimeField(allow_null=True)


# --- explain -------------------------------------------------------------------------------


class ExplainRequest(serializers.Serializer):
    name = _name_field(required=False, allow_null=True, help_text="A policy or alias.")
    spec = JSONObjectField(
        required=False, allow_null=True, help_text="An unsaved spec (wins over `name`)."
    )
    user_id = StrictCharField(
        max_length=255, required=False, allow_null=True, help_text="Resolve and match as."
    )
    key_id = StrictCharField(max_length=255, required=False, allow_null=True)
    budget_used_pct = NumberField(required=False, allow_null=True)
    budget_remaining_usd = NumberField(required=False, allow_null=True)
    allowed_models = serializers.ListField(
        child=StrictCharField(max_length=255),
        required=False,
        allow_null=True,
        max_length=1000,
        help_text="Simulate an API key's allow-list; omit for unrestricted.",
        error_messages={"not_a_list": "Must be a list of strings or null."},
    )


class ExplainCandidate(serializers.Serializer):
    position = serializers.IntegerField()
    target = serializers.CharField()
    provider = serializers.CharField()
    model = serializers.CharField()
    selection_reason = serializers.CharField()


class ExplainDropped(serializers.Serializer):
    target = serializers.CharField()
    reason = serializers.CharField(help_text="not_allowed, cooling_down or unresolvable.")
    detail = serializers.CharField()


class ExplainResponse(serializers.Serializer):
    name = serializers.CharField()
    selection_reason = serializers.CharField(
        help_text="default, condition:<names>, router:weighted, on_failure, or none."
    )
    is_dynamic = serializers.BooleanField()
    candidates = ExplainCandidate(many=True)
    dropped = ExplainDropped(many=True)
    router_weights = serializers.DictField(
        child=serializers.FloatField(),
        allow_null=True,
        help_text="A weighted router's percent per usable candidate; null otherwise.",
    )
