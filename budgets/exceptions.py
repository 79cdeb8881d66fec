"""Domain errors raised by budgets.services, in the order admission checks them (§3.3)."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings

from common.exceptions import AuthenticationFailed, GatewayError, NotFound, PermissionDenied
from common.rest import quoted_id
from usage.models import BUDGET_EXCEEDED

if TYPE_CHECKING:
    from budgets.services.holds import BudgetState


class UnknownUser(NotFound):
    code = "user_not_found"
    message = "User not found"


class UserBlocked(PermissionDenied):
    code = "user_blocked"
    message = "User is blocked"


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"
    message = "This API key or user may not use this model"


class BudgetExceeded(PermissionDenied):
    """A hold that does not fit. `state` is the refusing budget's money when it was
    refused (the user's, or a ceiling's: `level` names it, "Workspace"; None for the
    user's own budget) and `needed_usd` the hold asked for, so that the refusal can
    explain itself."""

    code = BUDGET_EXCEEDED
    message = "Budget exceeded"

    def __init__(
        self,
        message: str | None = None,
        *,
        state: BudgetState | None = None,
        needed_usd: Decimal | None = None,
        level: str | None = None,
        **kwargs: Any,
    ) -> None:
        if message is None and level is not None:
            message = f"{level} budget exceeded"
        super().__init__(message, **kwargs)
        self.state = state
        self.needed_usd = needed_usd
        self.level = level


class PricingMissing(GatewayError):
    status = 402
    code = "pricing_not_found"
    message = "No price is configured for this model"

    @classmethod
    def for_model(cls, model_key: str) -> PricingMissing:
        """The refusal that tells the operator how to price the model."""
        catalog = (
            "the price catalog does not know it"
            if settings.OTARI_PRICE_CATALOG
            else "the price catalog is off (OTARI_PRICE_CATALOG)"
        )
        return cls(
            f"No price for model '{model_key}', and {catalog}. "
            f"An operator can price it under `pricing:` in the config file (OTARI_CONFIG), "
            f"with the management API (POST /v1/pricing, model_key '{model_key}'), or in "
            "the console (Model prices)."
        )


class InvalidAPIKey(AuthenticationFailed):
    code = "invalid_api_key"
    message = "Invalid API key"


class MissingAPIKey(AuthenticationFailed):
    code = "missing_api_key"
    message = "Missing API key: send Authorization: Bearer <key>"


class InactiveAPIKey(AuthenticationFailed):
    code = "api_key_inactive"
    message = "API key is inactive"


class ExpiredAPIKey(AuthenticationFailed):
    code = "api_key_expired"
    message = "API key has expired"


class InvalidAlertSettings(GatewayError):
    status = 422
    code = "invalid_alert_settings"
    message = "Invalid budget alert settings"


class InvalidRateLimit(GatewayError):
    status = 422
    code = "invalid_rate_limit"
    message = "Invalid rate limit"


class UnknownWorkspace(NotFound):
    code = "workspace_not_found"
    message = "Workspace not found"

    @classmethod
    def named(cls, workspace_id: Any) -> UnknownWorkspace:
        return cls(f"Workspace {quoted_id(str(workspace_id))} not found")


class UnknownCeiling(NotFound):
    code = "scoped_budget_not_found"
    message = "Scoped budget not found"

    @classmethod
    def named(cls, ceiling_id: Any) -> UnknownCeiling:
        return cls(f"Scoped budget {quoted_id(str(ceiling_id))} not found")


class UnknownScope(NotFound):
    """A ceiling naming nothing would be created, listed and never bind (otari refuses
    it for the same reason), so an unknown or malformed scope id is refused."""

    code = "scope_not_found"
    message = "Scope not found"


class InvalidScope(GatewayError):
    status = 422
    code = "invalid_scope"
    message = "Invalid scope"


class UnknownProvider(NotFound):
    code = "provider_not_found"
    message = "The provider named by provider_key_id is not configured"
