"""The deployment's organization and its workspaces (docs/API.md, "Workspaces").

One organization per deployment and a default workspace, both at fixed ids
(budgets.models) and provisioned on first use (the migration creates them; a database
flushed since gets them back here). A key's workspace is fixed when it is issued.
"""

from __future__ import annotations

from budgets.models import (
    DEFAULT_ORGANIZATION_ID,
    DEFAULT_WORKSPACE_ID,
    Organization,
    Workspace,
)


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
