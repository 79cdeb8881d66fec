"""The deployment's organization and its workspaces (docs/API.md, "Workspaces").

One organization per deployment and a default workspace, both at fixed ids
(budgets.models) and provisioned on first use (the migration creates them; a database
flushed since gets them back here). A key's workspace is fixed when it is issued.

A workspace is deleted only when nothing refers to it: no key (revoked ones included:
their rows stay so that usage keeps naming them), no usage row, no ceiling. The
default workspace is never deleted: keys without a workspace and the master key's
requests belong to it.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import ProtectedError, QuerySet
from django.utils import timezone

from budgets.exceptions import UnknownWorkspace
from budgets.models import (
    DEFAULT_ORGANIZATION_ID,
    DEFAULT_WORKSPACE_ID,
    APIKey,
    Ceiling,
    Organization,
    Workspace,
)
from budgets.services.accounts import UNSET
from common.exceptions import Conflict
from common.rest import quoted_id
from usage.models import UsageLog

# How many referring rows a refusal names before it says "and N more".
NAMED_IN_REFUSAL = 5


def organization_ensure() -> Organization:
    """The deployment's organization, created on first use (safe under races: the id is
    fixed, so a second creator finds the first's row)."""
    organization, _ = Organization.objects.get_or_create(id=DEFAULT_ORGANIZATION_ID)
    return organization


def default_workspace_ensure() -> Workspace:
    """The default workspace, created on first use."""
    workspace = Workspace.objects.filter(pk=DEFAULT_WORKSPACE_ID).first()
    if workspace is not None:
        return workspace
    workspace, _ = Workspace.objects.get_or_create(
        id=DEFAULT_WORKSPACE_ID,
        defaults={"organization": organization_ensure(), "name": "Default"},
    )
    return workspace


def workspace_id_parse(value: Any) -> uuid.UUID:
    """A workspace id from a URL or a body, as a UUID; anything else names no workspace
    (UnknownWorkspace, 404, as otari answers a malformed id)."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise UnknownWorkspace.named(value) from None


def workspace_get(*, workspace_id: Any) -> Workspace:
    """The workspace, or UnknownWorkspace. The default one is provisioned if a flushed
    database lost it, so that it always exists for the API."""
    pk = workspace_id_parse(workspace_id)
    if pk == DEFAULT_WORKSPACE_ID:
        return default_workspace_ensure()
    workspace = Workspace.objects.filter(pk=pk).first()
    if workspace is None:
        raise UnknownWorkspace.named(workspace_id)
    return workspace


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A workspace named {quoted_id(name)} already exists", code="workspace_exists")


def workspace_create(*, name: str, description: str = "") -> Workspace:
    """A new workspace in the deployment's organization. Names are unique there (409)."""
    with transaction.atomic(durable=True):
        organization = organization_ensure()
        # Also the default workspace's name: provision it first so that it is taken.
        default_workspace_ensure()
        if Workspace.objects.filter(organization=organization, name=name).exists():
            raise _name_taken(name)
        try:
            # A savepoint: the unique constraint decides a race the check above lost.
            with transaction.atomic():
                return Workspace.objects.create(
                    organization=organization, name=name, description=description
                )
        except IntegrityError:
            raise _name_taken(name) from None


def workspace_update(
    *, workspace_id: Any, name: str = UNSET, description: str = UNSET
) -> Workspace:
    """Rename a workspace or change its description (a taken name: 409)."""
    with transaction.atomic(durable=True):
        workspace = workspace_get(workspace_id=workspace_id)
        changes = {
            field: value
            for field, value in (("name", name), ("description", description))
            if value is not UNSET
        }
        if not changes:
            return workspace
        if (
            "name" in changes
            and Workspace.objects.filter(organization_id=workspace.organization_id, name=name)
            .exclude(pk=workspace.pk)
            .exists()
        ):
            raise _name_taken(name)
        try:
            with transaction.atomic():
                Workspace.objects.filter(pk=workspace.pk).update(
                    **changes, updated_at=timezone.now()
                )
        except IntegrityError:
            raise _name_taken(name) from None
        workspace.refresh_from_db()
        return workspace


def _listed(names: list[str], total: int) -> str:
    more = f" and {total - len(names)} more" if total > len(names) else ""
    return ", ".join(names) + more


def ceilings_listed(ceilings: QuerySet[Ceiling]) -> str:
    """The ceilings in a refusal's way, as it names them: id (name), the first few."""
    total = ceilings.count()
    first = ceilings.order_by("created_at", "pk")[:NAMED_IN_REFUSAL]
    return _listed([f"{c.pk} ({c.name})" if c.name else str(c.pk) for c in first], total)


def workspace_delete(*, workspace_id: Any) -> None:
    """Delete a workspace nothing refers to; otherwise Conflict (409) saying what does.

    Ceilings on the workspace are refused too, rather than deleted with it (otari
    deletes them): a spending cap disappears only when an operator deletes it.
    """
    pk = workspace_id_parse(workspace_id)
    if pk == DEFAULT_WORKSPACE_ID:
        raise Conflict("The default workspace cannot be deleted", code="workspace_default")
    with transaction.atomic(durable=True):
        # FOR UPDATE: a key or usage row being inserted for this workspace takes a key
        # share lock on it, so the checks below cannot miss one that commits meanwhile
        # (it waits for this delete, then fails its foreign key: 409).
        workspace = Workspace.objects.select_for_update().filter(pk=pk).first()
        if workspace is None:
            raise UnknownWorkspace.named(workspace_id)
        keys = APIKey.objects.filter(workspace=workspace)
        key_count = keys.count()
        if key_count:
            first = keys.order_by("created_at").values_list("pk", flat=True)[:NAMED_IN_REFUSAL]
            names = [str(key_id) for key_id in first]
            raise Conflict(
                f"The workspace still has {key_count} API key(s) (revoked ones count: usage "
                f"names them): {_listed(names, key_count)}",
                code="workspace_in_use",
            )
        if UsageLog.objects.filter(workspace=workspace).exists():
            raise Conflict(
                "The workspace has usage rows; they keep it for the usage history",
                code="workspace_in_use",
            )
        ceilings = Ceiling.objects.filter(
            scope_type=Ceiling.Scope.WORKSPACE, scope_id=str(workspace.pk)
        )
        if ceilings.exists():
            raise Conflict(
                f"The workspace is capped by scoped budget(s) {ceilings_listed(ceilings)}; "
                "delete them first",
                code="workspace_in_use",
            )
        try:
            workspace.delete()
        except ProtectedError:  # pragma: no cover - the checks above name every reference
            raise Conflict("The workspace is still referenced", code="workspace_in_use") from None
