"""Ceilings (scoped budgets, docs/API.md "Scoped budgets"): creating, changing and
deleting them. A ceiling caps what the organization, a workspace or one API key spends
(optionally at one provider), on the limit and period of the budget it names.

Its money (`spend`, `reserved`) is never edited here: holds.py moves it and periods.py
rolls it, exactly as for users. What is written here follows the users' rules
(accounts.py): a new ceiling, or one moved to another budget, starts a fresh window now
(the spend of the window that ends is kept in a reset log); a top-up replaces the last.

A ceiling must name something that exists, or it would be listed and never bind: the
deployment's organization, an existing workspace, an existing key (otari refuses the
same way). Scope ids are stored as canonical UUID text, since that is what requests are
matched on.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from budgets import selectors
from budgets.exceptions import (
    InvalidScope,
    UnknownCeiling,
    UnknownProvider,
    UnknownScope,
)
from budgets.models import DEFAULT_ORGANIZATION_ID, APIKey, Budget, Ceiling
from budgets.services.accounts import UNSET
from budgets.services.periods import start_fresh_window
from budgets.services.tenancy import organization_ensure, workspace_get
from common.config import gateway_config
from common.exceptions import Conflict, NotFound

ZERO = Decimal("0")
SCOPE_TYPES = tuple(choice.value for choice in Ceiling.Scope)


def scope_id_canonical(*, scope_type: str, scope_id: str) -> str:
    """The scope's id as stored and matched: canonical (lowercase, hyphenated) UUID
    text. An unknown scope type is InvalidScope (422); an id that is no UUID names
    nothing (UnknownScope, 404, as otari answers)."""
    if scope_type not in SCOPE_TYPES:
        raise InvalidScope("scope_type: Must be one of: " + ", ".join(SCOPE_TYPES) + ".")
    try:
        return str(uuid.UUID(scope_id))
    except (ValueError, TypeError, AttributeError):
        raise UnknownScope(_scope_missing(scope_type)) from None


# How an error names what scope_id should have named.
_SCOPE_NOUNS = {
    Ceiling.Scope.ORGANIZATION: "organization",
    Ceiling.Scope.WORKSPACE: "workspace",
    Ceiling.Scope.API_TOKEN: "API key",
}


def _scope_missing(scope_type: str) -> str:
    return f"The {_SCOPE_NOUNS[Ceiling.Scope(scope_type)]} named by scope_id was not found"


def _scope_check_exists(*, scope_type: str, scope_id: str) -> None:
    """UnknownScope unless the scope exists (scope_id canonical)."""
    if scope_type == Ceiling.Scope.ORGANIZATION:
        exists = scope_id == str(DEFAULT_ORGANIZATION_ID)
        if exists:
            organization_ensure()
    elif scope_type == Ceiling.Scope.WORKSPACE:
        try:
            workspace_get(workspace_id=scope_id)
        except NotFound:
            exists = False
        else:
            exists = True
    else:
        exists = APIKey.objects.filter(pk=scope_id).exists()
    if not exists:
        raise UnknownScope(_scope_missing(scope_type))


def provider_check(provider: str) -> None:
    """A narrowed ceiling names a configured provider instance (OTARI_CONFIG or the
    OPENAI_/ANTHROPIC_ environment shortcuts, common.config): a typo would never bind.
    Read from the configuration, not from llm_proxy, which budgets does not import.
    """
    if provider and provider not in gateway_config().providers:
        configured = ", ".join(sorted(gateway_config().providers)) or "none"
        raise UnknownProvider(
            "The provider named by provider_key_id is not configured; configured "
            f"providers: {configured}"
        )


def _budget_get(budget_id: str) -> Budget:
    budget = Budget.objects.filter(pk=budget_id).first()
    if budget is None:
        raise NotFound("The budget named by budget_id was not found", code="budget_not_found")
    return budget


def ceiling_id_parse(ceiling_id: Any) -> uuid.UUID:
    if isinstance(ceiling_id, uuid.UUID):
        return ceiling_id
    try:
        return uuid.UUID(str(ceiling_id))
    except ValueError:
        raise UnknownCeiling.named(ceiling_id) from None


def _ceiling_lock(ceiling_id: Any) -> Ceiling:
    try:
        return selectors.ceiling_lock(ceiling_id_parse(ceiling_id))
    except Ceiling.DoesNotExist:
        raise UnknownCeiling.named(ceiling_id) from None


def _duplicate(existing: Ceiling | None) -> Conflict:
    which = f" ({existing.pk})" if existing is not None else ""
    return Conflict(
        f"A scoped budget{which} already caps this scope and provider",
        code="scoped_budget_exists",
    )


def ceiling_create(
    *,
    scope_type: str,
    scope_id: str,
    budget_id: str,
    name: str = "",
    provider: str = "",
    now: datetime | None = None,
) -> Ceiling:
    """A ceiling on an existing scope, at most one per (scope, provider) (409), whose
    first window starts now on `budget_id`'s period."""
    scope_id = scope_id_canonical(scope_type=scope_type, scope_id=scope_id)
    provider_check(provider)
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        budget = _budget_get(budget_id)
        _scope_check_exists(scope_type=scope_type, scope_id=scope_id)
        same_scope = Ceiling.objects.filter(
            scope_type=scope_type, scope_id=scope_id, provider=provider
        )
        if (existing := same_scope.first()) is not None:
            raise _duplicate(existing)
        try:
            # A savepoint: the unique constraint decides a race the check above lost.
            with transaction.atomic():
                ceiling = Ceiling.objects.create(
                    scope_type=scope_type,
                    scope_id=scope_id,
                    provider=provider,
                    budget=budget,
                    name=name,
                )
        except IntegrityError:
            raise _duplicate(None) from None
        # No lock needed: no other transaction can see the row yet.
        start_fresh_window(ceiling, budget, now)
        ceiling.refresh_from_db()
        return ceiling


def ceiling_update(
    *,
    ceiling_id: Any,
    name: str = UNSET,
    budget_id: str = UNSET,
    now: datetime | None = None,
) -> Ceiling:
    """Rename a ceiling or point it at another budget. A different budget starts a
    fresh window now: spend 0, the old window's spend kept in a CeilingResetLog (as a
    user moved to another budget, accounts.user_update). Open holds stay reserved and
    settle into the new window. The scope and the provider are not editable: that
    would move the spend to another identity (delete and create instead)."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        ceiling = _ceiling_lock(ceiling_id)
        if budget_id is not UNSET and budget_id != ceiling.budget_id:
            start_fresh_window(ceiling, _budget_get(budget_id), now)
        if name is not UNSET:
            Ceiling.objects.filter(pk=ceiling.pk).update(name=name, updated_at=now)
        ceiling.refresh_from_db()
        return ceiling


def ceiling_delete(*, ceiling_id: Any) -> None:
    """Delete a ceiling. Its open holds' links go with it (HoldCeiling cascades), so a
    request in flight settles into nothing there: the cap no longer exists. Its reset
    logs stay."""
    with transaction.atomic(durable=True):
        # Locked like every statement that moves its money, so no settlement is
        # half-applied to it while it goes.
        ceiling = _ceiling_lock(ceiling_id)
        ceiling.delete()


def ceiling_topup(*, ceiling_id: Any, amount_usd: Decimal, expires_at: datetime | None) -> Ceiling:
    """Raise a ceiling's limit by `amount_usd` until `expires_at` (0 or None removes
    it), as accounts.user_topup_set does for a user: it replaces any previous top-up
    and is added to the budget's max at admission."""
    with transaction.atomic(durable=True):
        ceiling = _ceiling_lock(ceiling_id)
        if not amount_usd or expires_at is None:
            amount_usd, expires_at = ZERO, None
        Ceiling.objects.filter(pk=ceiling.pk).update(
            topup_usd=amount_usd, topup_expires_at=expires_at, updated_at=timezone.now()
        )
        ceiling.refresh_from_db()
        return ceiling
