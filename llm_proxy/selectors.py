"""Reads of aliases and routing policies for the management API and the console: the
configured ones (OTARI_CONFIG) and the stored ones, merged as otari lists them.

Every scope at once (global and user-scoped): this is the operator's view, not what one
caller resolves (llm_proxy.routing.registry.policy_lookup answers that). Keyed on
(name, scope): the same name may exist globally and per user, and both are rows to
manage. Configured entries are merged last, so when a global name somehow exists on
both sides the one that resolves is the one listed (the configured one: a stored global
name that a configured one shadows is refused when written, so this only happens when
the configuration gains the name later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing.registry import config_routing, stored_policy
from llm_proxy.routing.spec import Policy


@dataclass(frozen=True)
class RoutingEntry:
    """An alias or a policy as listed: `target` for an alias, `spec` for both (an alias
    is the policy `{select: [{default: target}]}`)."""

    kind: Literal["alias", "policy"]
    name: str
    source: Literal["config", "stored"]
    user_id: str | None
    spec: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    # Whether the target depends on the request; False for a stored row this build
    # cannot read (listed as it is, so an operator can see and fix it).
    is_dynamic: bool = False
    # None: a stored row that no longer parses.
    policy: Policy | None = None
    pk: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def scope(self) -> str:
        return f"user {self.user_id}" if self.user_id else "global"


def _sorted(entries: dict[tuple[str, str], RoutingEntry]) -> list[RoutingEntry]:
    return sorted(entries.values(), key=lambda e: (e.name, e.user_id or ""))


def alias_list() -> list[RoutingEntry]:
    merged: dict[tuple[str, str], RoutingEntry] = {}
    for row in Alias.objects.order_by("name", "user_id"):
        merged[(row.name, row.user_id)] = _stored_alias(row)
    for name, policy in config_routing().aliases.items():
        merged[(name, "")] = _configured(name, policy)
    return _sorted(merged)


def policy_list() -> list[RoutingEntry]:
    merged: dict[tuple[str, str], RoutingEntry] = {}
    for row in RoutingPolicy.objects.order_by("name", "user_id"):
        merged[(row.name, row.user_id)] = _stored(row)
    for name, policy in config_routing().policies.items():
        merged[(name, "")] = _configured(name, policy)
    return _sorted(merged)


def _stored(row: RoutingPolicy) -> RoutingEntry:
    policy = stored_policy(
        kind="policy", name=row.name, user_id=row.user_id, target="", spec=row.spec
    )
    return RoutingEntry(
        kind="policy",
        name=row.name,
        source="stored",
        user_id=row.user_id or None,
        spec=row.spec,
        is_dynamic=policy.is_dynamic if policy is not None else False,
        policy=policy,
        pk=row.pk,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _stored_alias(row: Alias) -> RoutingEntry:
    policy = stored_policy(
        kind="alias", name=row.name, user_id=row.user_id, target=row.target, spec=None
    )
    return RoutingEntry(
        kind="alias",
        name=row.name,
        source="stored",
        user_id=row.user_id or None,
        target=row.target,
        spec=policy.spec if policy is not None else {"select": [{"default": row.target}]},
        policy=policy,
        pk=row.pk,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _configured(name: str, policy: Policy) -> RoutingEntry:
    return RoutingEntry(
        kind=policy.kind,
        name=name,
        source="config",
        user_id=None,
        spec=policy.spec,
        target=policy.default_target if policy.kind == "alias" else "",
        is_dynamic=policy.is_dynamic,
        policy=policy,
    )


def policy_entry(name: str, *, user_id: str | None, source: str) -> RoutingEntry | None:
    """One listed policy or alias (the console's plan page): the stored one in the scope
    of `user_id`, or the configured one of that name."""
    if source == "config":
        policy = config_routing().get(name)
        return _configured(name, policy) if policy is not None else None
    row = RoutingPolicy.objects.filter(name=name, user_id=user_id or "").first()
    if row is not None:
        return _stored(row)
    alias = Alias.objects.filter(name=name, user_id=user_id or "").first()
    return _stored_alias(alias) if alias is not None else None
