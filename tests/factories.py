"""Plain factory functions (no factory_boy): defaults filled in with setdefault."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from budgets.models import APIKey, Budget, Ceiling, GatewayUser, Organization, Workspace
from budgets.services import accounts, ceilings, keys, tenancy
from usage.models import ModelPricing
from usage.services import pricing_set

_counter = iter(range(1, 1_000_000))


def make_budget(**kwargs: Any) -> Budget:
    kwargs.setdefault("name", f"budget-{next(_counter)}")
    return accounts.budget_create(**kwargs)


def make_user(budget: Budget | None = None, **kwargs: Any) -> GatewayUser:
    kwargs.setdefault("user_id", f"user-{next(_counter)}")
    return accounts.user_create(budget=budget, **kwargs)


def make_key(user: GatewayUser | None = None, **kwargs: Any) -> tuple[APIKey, str]:
    """A key and its secret."""
    return keys.api_key_create(user=user or make_user(), **kwargs)


def set_price(
    model_key: str = "openai:gpt-4o-mini",
    input_per_mtok: str = "0.15",
    output_per_mtok: str = "0.60",
    effective_at: datetime | None = None,
    **kwargs: Any,
) -> ModelPricing:
    return pricing_set(
        model_key=model_key,
        input_per_mtok=Decimal(input_per_mtok),
        output_per_mtok=Decimal(output_per_mtok),
        effective_at=effective_at,
        **kwargs,
    )


def priced(model: str, input_per_mtok: str = "0.15", output_per_mtok: str = "0.60") -> str:
    """Price `openai:<model>` (fake-provider behaviours live in model names) and return
    the selector."""
    set_price(f"openai:{model}", input_per_mtok, output_per_mtok)
    return f"openai:{model}"


def make_workspace(name: str | None = None) -> Workspace:
    """A workspace in the deployment's organization."""
    return tenancy.workspace_create(name=name or f"workspace-{next(_counter)}")


def make_ceiling(
    scope: Workspace | APIKey | Organization, budget: Budget, provider: str = "", **kwargs: Any
) -> Ceiling:
    """A ceiling on `scope`, created as the API creates one (its window starts now)."""
    scope_type = {
        Workspace: Ceiling.Scope.WORKSPACE,
        APIKey: Ceiling.Scope.API_TOKEN,
        Organization: Ceiling.Scope.ORGANIZATION,
    }[type(scope)]
    return ceilings.ceiling_create(
        scope_type=scope_type,
        scope_id=str(scope.pk),
        budget_id=budget.pk,
        provider=provider,
        **kwargs,
    )
