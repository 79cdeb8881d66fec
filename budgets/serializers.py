"""Wire shapes of the users, budgets, keys, reset-log and budget-alert API (docs/SPEC.md §6).

Field names are the API's (`max_budget`, `spend`, ...), mapped onto the models' unit-named
columns (`max_budget_usd`, `spend_usd`, ...). Output types are what the `otari` SDK's
strict models accept: money as JSON numbers, counters as integers, ids as strings,
timestamps as ISO 8601 with an offset. Serializers only validate and render; the views
call budgets.services for every write.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from budgets import alerting
from budgets.models import (
    DEFAULT_WORKSPACE_ID,
    MAX_RPM_LIMIT,
    MAX_TPM_LIMIT,
    APIKey,
    BudgetAlert,
    Ceiling,
    ResetAlignment,
)
from common.rest import (
    ChoiceField,
    ConstantField,
    DateTimeField,
    JSONObjectField,
    MoneyField,
    MoneyOutField,
    NullIntegerField,
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    allowed_models_field,
)

# A rolling period longer than a century is a typo, and would overflow date arithmetic.
MAX_DURATION_SEC = 100 * 365 * 86400
_ALIGNMENTS = [choice.value for choice in ResetAlignment]


@extend_schema_field({"type": "boolean", "nullable": True})
class NullBooleanField(ConstantField):
    """Always null: a per-key override of a deployment-wide behaviour (it inherits)."""


@extend_schema_field({"type": "string", "format": "uuid", "nullable": True})
class NullUUIDField(ConstantField):
    """Always null: a budget is the deployment's, not owned by its organization (a
    ceiling binds it to a scope; in otari, null is a budget no organization owns)."""


@extend_schema_field({"type": "integer", "description": "Always 0."})
class ZeroField(ConstantField):
    value = 0


@extend_schema_field({"type": "string", "format": "uuid"})
class KeyWorkspaceField(serializers.Field):
    """A key's workspace; a key issued before workspaces existed has none recorded and
    belongs to the default workspace."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        kwargs["source"] = "*"
        super().__init__(**kwargs)

    def to_representation(self, key: APIKey) -> str:
        return str(key.workspace_id or DEFAULT_WORKSPACE_ID)


def _identifier_validate(value: str) -> str:
    """A user id travels in URL paths: no slash, no control characters, no outer spaces."""
    if value != value.strip():
        raise serializers.ValidationError("Must not start or end with whitespace.")
    if "/" in value:
        raise serializers.ValidationError("Must not contain '/'.")
    if any(unicodedata.category(char).startswith("C") for char in value):
        raise serializers.ValidationError("Must not contain control characters.")
    return value


# ---------------------------------------------------------------------------------------
# Budgets


class _AlertSetting(serializers.Field):
    """A budget alert setting, passed through as sent: budgets.services validates it
    (budget_create/budget_update), with the same rules for the API, the admin and the
    tests, and refuses it with 422 invalid_alert_settings naming the rule, never the
    value (a webhook URL may carry a token)."""

    def to_internal_value(self, data: Any) -> Any:
        return data

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": alerting.MAX_THRESHOLD_PCT},
        "maxItems": alerting.MAX_THRESHOLDS,
        "description": "Whole percents of the limit at which to alert, once per user and "
        "period. Default [80, 100]; [] = no alerts.",
    }
)
class AlertThresholdsField(_AlertSetting):
    pass


@extend_schema_field(
    {
        "type": "string",
        "nullable": True,
        "maxLength": 2000,
        "description": "An http(s) URL that receives each alert as a JSON POST; "
        '"" or null = none. Never echoed in errors.',
    }
)
class AlertWebhookField(_AlertSetting):
    pass


@extend_schema_field(
    {
        "type": "array",
        "nullable": True,
        "items": {"type": "string", "format": "email"},
        "maxItems": alerting.MAX_EMAILS,
        "description": "Addresses mailed each alert; [] or null = none.",
    }
)
class AlertEmailsField(_AlertSetting):
    pass


# The API's names are the model's and the services' (docs/OPERATIONS.md).
ALERT_SETTINGS = ("alert_thresholds_pct", "alert_webhook_url", "alert_emails")


class BudgetSettings(serializers.Serializer):
    """Create (all optional) or PATCH (only what is sent changes; null clears)."""

    name = StrictCharField(max_length=200, allow_blank=True, allow_null=True, required=False)
    max_budget = MoneyField(
        allow_null=True, required=False, help_text="USD per period; null = uncapped."
    )
    budget_duration_sec = StrictIntegerField(
        min_value=1,
        max_value=MAX_DURATION_SEC,
        allow_null=True,
        required=False,
        help_text="Rolling period in seconds. Exclusive with reset_alignment.",
    )
    reset_alignment = ChoiceField(
        _ALIGNMENTS,
        allow_null=True,
        required=False,
        help_text="UTC calendar period. Exclusive with budget_duration_sec.",
    )
    request_limit = StrictIntegerField(
        min_value=0, allow_null=True, required=False, help_text="Not supported: must be null."
    )
    token_limit = StrictIntegerField(
        min_value=0, allow_null=True, required=False, help_text="Not supported: must be null."
    )
    alert_thresholds_pct = AlertThresholdsField(required=False)
    alert_webhook_url = AlertWebhookField(required=False, allow_null=True)
    alert_emails = AlertEmailsField(required=False, allow_null=True)


class BudgetResponse(serializers.Serializer):
    budget_id = serializers.CharField()
    name = serializers.CharField()
    max_budget = MoneyOutField(source="max_budget_usd", allow_null=True)
    budget_duration_sec = serializers.IntegerField(allow_null=True)
    reset_alignment = serializers.ChoiceField(_ALIGNMENTS, allow_null=True)
    request_limit = NullIntegerField()
    token_limit = NullIntegerField()
    organization_id = NullUUIDField()
    user_count = serializers.IntegerField(help_text="Live users on this budget.")
    total_spend = MoneyOutField(help_text="Their combined spend this period.")
    total_reserved = MoneyOutField(help_text="Their combined open holds.")
    alert_thresholds_pct = serializers.ListField(
        child=serializers.IntegerField(), help_text="Percents of the limit that alert."
    )
    alert_webhook_url = serializers.CharField(help_text='"" = no webhook.')
    alert_emails = serializers.ListField(child=serializers.CharField())
    created_at = DateTimeField()
    updated_at = DateTimeField()


class BudgetResetLogResponse(serializers.Serializer):
    id = serializers.IntegerField()
    budget_id = serializers.CharField()
    user_id = serializers.CharField()
    previous_spend = MoneyOutField(source="previous_spend_usd")
    reset_at = DateTimeField()
    next_reset_at = DateTimeField(allow_null=True)


@extend_schema_field({"type": "array", "items": {"type": "string", "enum": ["webhook", "email"]}})
class _AlertChannelsField(serializers.Field):
    """Where the alert was sent (as configured when it was raised); not the webhook
    URL itself, which may carry a token."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        kwargs["source"] = "*"
        super().__init__(**kwargs)

    def to_representation(self, alert: BudgetAlert) -> list[str]:
        return [
            name
            for name, configured in (("webhook", alert.webhook_url), ("email", alert.emails))
            if configured
        ]


class BudgetAlertResponse(serializers.Serializer):
    id = serializers.IntegerField()
    budget_id = serializers.CharField()
    user_id = serializers.CharField()
    threshold_pct = serializers.IntegerField()
    spend = MoneyOutField(source="spend_usd", help_text="The user's spend when it was raised.")
    limit = MoneyOutField(source="limit_usd", help_text="Their limit then (with any top-up).")
    period_started_at = DateTimeField()
    period_ends_at = DateTimeField(allow_null=True, help_text="Null: the budget never resets.")
    status = serializers.ChoiceField([s.value for s in BudgetAlert.Status])
    channels = _AlertChannelsField()
    webhook_delivered_at = DateTimeField(allow_null=True)
    email_delivered_at = DateTimeField(allow_null=True)
    attempts = serializers.IntegerField()
    last_attempt_at = DateTimeField(allow_null=True)
    last_error = serializers.CharField(help_text='The last failure, per channel; "" = none.')
    created_at = DateTimeField()


# ---------------------------------------------------------------------------------------
# Rate limits (users and keys)


def _rate_limit_field(maximum: int, help_text: str) -> StrictIntegerField:
    """A rate limit: a JSON integer 1..maximum, or null for none (budgets.services applies
    the same rule). The errors name the range, never the value sent."""
    message = f"Must be an integer from 1 to {maximum}, or null for no limit."
    return StrictIntegerField(
        min_value=1,
        max_value=maximum,
        allow_null=True,
        required=False,
        help_text=help_text,
        error_messages={
            "invalid": message,
            "min_value": message,
            "max_value": message,
            "max_string_length": message,
        },
    )


def rpm_limit_field() -> StrictIntegerField:
    return _rate_limit_field(
        MAX_RPM_LIMIT, "Requests per minute; null = unlimited. Over it: 429 with Retry-After."
    )


def tpm_limit_field() -> StrictIntegerField:
    return _rate_limit_field(
        MAX_TPM_LIMIT,
        "Tokens (prompt + completion) per minute; null = unlimited. Over it: 429.",
    )


# ---------------------------------------------------------------------------------------
# Users


class UpdateUser(serializers.Serializer):
    """PATCH: only what is sent changes. `budget_id: null` takes the user off their
    budget; a different budget starts a fresh window (§3.6); a null rate limit removes
    it."""

    alias = StrictCharField(max_length=255, allow_blank=True, allow_null=True, required=False)
    budget_id = StrictCharField(max_length=64, allow_null=True, required=False)
    blocked = StrictBooleanField(allow_null=True, required=False)
    allowed_models = allowed_models_field(required=False)
    metadata = JSONObjectField(allow_null=True, required=False)
    rpm_limit = rpm_limit_field()
    tpm_limit = tpm_limit_field()


class CreateUser(UpdateUser):
    # Not trimmed: an id is exactly what was sent (outer spaces are refused instead).
    user_id = StrictCharField(
        max_length=255, trim_whitespace=False, validators=[_identifier_validate]
    )


class UserTopup(serializers.Serializer):
    amount = MoneyField(help_text="USD added to the budget's max until expires_at; 0 removes.")
    expires_at = DateTimeField(
        allow_null=True, required=False, help_text="Required with a positive amount."
    )


class UserResponse(serializers.Serializer):
    user_id = serializers.CharField()
    alias = serializers.CharField()
    budget_id = serializers.CharField(allow_null=True)
    blocked = serializers.BooleanField()
    allowed_models = serializers.ListField(child=serializers.CharField(), allow_null=True)
    metadata = serializers.DictField()
    spend = MoneyOutField(source="spend_usd", help_text="Settled cost this period.")
    reserved = MoneyOutField(source="reserved_usd", help_text="Open holds.")
    lifetime_spend = MoneyOutField(source="lifetime_spend_usd")
    topup = MoneyOutField(source="topup_usd", help_text="Temporary addition to the limit.")
    topup_expires_at = DateTimeField(allow_null=True)
    budget_started_at = DateTimeField(allow_null=True)
    next_budget_reset_at = DateTimeField(allow_null=True)
    current_requests = serializers.IntegerField(help_text="Counted requests this period.")
    current_tokens = serializers.IntegerField(help_text="Their tokens.")
    reserved_requests = serializers.IntegerField(help_text="Requests in flight (open holds).")
    reserved_tokens = ZeroField(help_text="Tokens are not reserved: always 0.")
    budget_refused_at = DateTimeField(
        allow_null=True,
        help_text="The last refusal for budget in this period (null: none); the user is out "
        "of budget for the requests it makes, whatever share of the limit is spent.",
    )
    rpm_limit = serializers.IntegerField(
        allow_null=True, help_text="Requests per minute, all the user's requests; null = none."
    )
    tpm_limit = serializers.IntegerField(
        allow_null=True, help_text="Tokens per minute, all the user's requests; null = none."
    )
    created_at = DateTimeField()
    updated_at = DateTimeField()


# ---------------------------------------------------------------------------------------
# API keys


class UpdateKey(serializers.Serializer):
    """PATCH: only what is sent changes; null clears `expires_at`, `allowed_models` and
    the rate limits. The key's limits apply on top of its user's."""

    key_name = StrictCharField(max_length=200, allow_blank=True, allow_null=True, required=False)
    is_active = StrictBooleanField(allow_null=True, required=False)
    expires_at = DateTimeField(allow_null=True, required=False)
    allowed_models = allowed_models_field(required=False)
    exclude_from_budget = StrictBooleanField(allow_null=True, required=False)
    metadata = JSONObjectField(allow_null=True, required=False)
    rpm_limit = rpm_limit_field()
    tpm_limit = tpm_limit_field()
    capture_agent_telemetry = StrictBooleanField(
        allow_null=True, required=False, help_text="Not supported: null or false."
    )
    reject_user_mismatch = StrictBooleanField(
        allow_null=True,
        required=False,
        help_text="Always on here (a key naming another user is refused): null or true.",
    )
    workspace_id = StrictCharField(
        max_length=255,
        allow_null=True,
        required=False,
        help_text="Fixed when the key is issued: null or the key's own workspace; "
        "another is refused (422).",
    )


class CreateKey(UpdateKey):
    user_id = StrictCharField(
        max_length=255,
        allow_null=True,
        required=False,
        help_text="The user the key bills. Omitted: a user of its own is created.",
    )
    workspace_id = StrictCharField(
        max_length=255,
        allow_null=True,
        required=False,
        help_text="An existing workspace (404 otherwise); omitted or null: the default "
        "workspace. Fixed for the key's life.",
    )


class KeyInfo(serializers.Serializer):
    id = serializers.CharField()
    user_id = serializers.CharField()
    key_name = serializers.CharField()
    key_prefix = serializers.CharField()
    key_suffix = serializers.CharField()
    is_active = serializers.BooleanField()
    expires_at = DateTimeField(allow_null=True)
    last_used_at = DateTimeField(allow_null=True)
    allowed_models = serializers.ListField(child=serializers.CharField(), allow_null=True)
    exclude_from_budget = serializers.BooleanField()
    metadata = serializers.DictField()
    rpm_limit = serializers.IntegerField(
        allow_null=True, help_text="Requests per minute with this key; null = none."
    )
    tpm_limit = serializers.IntegerField(
        allow_null=True, help_text="Tokens per minute with this key; null = none."
    )
    capture_agent_telemetry = NullBooleanField()
    reject_user_mismatch = NullBooleanField()
    workspace_id = KeyWorkspaceField()
    created_at = DateTimeField()
    updated_at = DateTimeField()


class CreateKeyResponse(KeyInfo):
    key = serializers.CharField(
        source="secret", help_text="The secret, shown this once (create and rotate)."
    )


# ---------------------------------------------------------------------------------------
# Workspaces


class UpdateWorkspace(serializers.Serializer):
    """PATCH: only what is sent changes; a null name is no change, a null description
    clears it."""

    name = StrictCharField(max_length=255, allow_null=True, required=False)
    description = StrictCharField(
        max_length=1024, allow_blank=True, allow_null=True, required=False
    )


class CreateWorkspace(UpdateWorkspace):
    name = StrictCharField(max_length=255, help_text="Unique in the organization.")


class WorkspaceResponse(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    organization_id = serializers.UUIDField()
    created_at = DateTimeField()
    updated_at = DateTimeField()


class MessageResponse(serializers.Serializer):
    message = serializers.CharField()


class WorkspacesResponse(serializers.Serializer):
    data = WorkspaceResponse(many=True)
    count = serializers.IntegerField(help_text="All the workspaces, not just this page.")


# ---------------------------------------------------------------------------------------
# Scoped budgets (ceilings)

SCOPE_TYPES = [choice.value for choice in Ceiling.Scope]


class UpdateCeiling(serializers.Serializer):
    """PATCH: only what is sent changes; a null name clears it, a null budget_id is no
    change. Scope and provider are fixed (delete and create instead)."""

    name = StrictCharField(max_length=200, allow_blank=True, allow_null=True, required=False)
    budget_id = StrictCharField(
        max_length=255,
        allow_null=True,
        required=False,
        help_text="Another budget starts a fresh window now; the old spend is kept in a reset log.",
    )


class CreateCeiling(UpdateCeiling):
    scope_type = ChoiceField(SCOPE_TYPES)
    scope_id = StrictCharField(
        max_length=255,
        help_text="The organization's, a workspace's or an API key's id (404 if none).",
    )
    budget_id = StrictCharField(
        max_length=255, help_text="The budget whose limit and period this ceiling enforces."
    )
    provider_key_id = StrictCharField(
        max_length=255,
        allow_blank=True,
        allow_null=True,
        required=False,
        help_text="A configured provider instance to narrow the cap to (404 if none); "
        "null: every provider.",
    )


@extend_schema_field({"type": "string", "nullable": True})
class _BlankAsNullField(serializers.CharField):
    """A text column where "" means "none", reported as null (otari's shape)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: str) -> str | None:
        return value or None


class CeilingResponse(serializers.Serializer):
    id = serializers.UUIDField()
    scope_type = serializers.ChoiceField(SCOPE_TYPES)
    scope_id = serializers.CharField()
    provider_key_id = _BlankAsNullField(
        source="provider", help_text="The provider instance capped; null: every provider."
    )
    budget_id = serializers.CharField()
    name = _BlankAsNullField()
    max_budget = MoneyOutField(source="budget.max_budget_usd", allow_null=True)
    current_spend = MoneyOutField(source="spend_usd", help_text="Settled cost this period.")
    reserved_spend = MoneyOutField(source="reserved_usd", help_text="Open holds.")
    budget_duration_sec = serializers.IntegerField(
        source="budget.budget_duration_sec", allow_null=True
    )
    reset_alignment = serializers.ChoiceField(
        _ALIGNMENTS, source="budget.reset_alignment", allow_null=True
    )
    period_start = DateTimeField(source="budget_started_at", allow_null=True)
    period_end = DateTimeField(
        source="next_budget_reset_at", allow_null=True, help_text="Null: never resets."
    )
    lifetime_spend = MoneyOutField(source="lifetime_spend_usd")
    topup = MoneyOutField(source="topup_usd", help_text="Temporary addition to the limit.")
    topup_expires_at = DateTimeField(allow_null=True)
    created_at = DateTimeField()
    updated_at = DateTimeField()
