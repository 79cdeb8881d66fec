"""Writes of stored aliases and routing policies (the management API and console call
these; docs/ROUTING.md). Each validates through spec.py and refuses, as otari does:

- a global name that a configured one of the same kind already answers to (the
  configured one wins resolution, so the stored one would be dead config); a
  user-scoped one may shadow it: that is what scoping is for;
- an alias named like a policy, or a policy named like an alias, in any scope or in the
  configuration (both would claim the same model name; one would be dead);
- a user_id that names no user (it could never resolve).

SpecError is the API's 400, NotFound its 404, Conflict its 409.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from budgets.models import GatewayUser
from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing.registry import config_routing
from llm_proxy.routing.spec import SpecError, alias_policy, parse_policy


class NotFound(LookupError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Conflict(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _scope(user_id: str | None) -> str:
    return user_id or ""


def _describe_scope(user_id: str) -> str:
    return f"scoped to user '{user_id}'" if user_id else "global"


def _require_user(user_id: str) -> None:
    if user_id and not GatewayUser.objects.filter(user_id=user_id).exists():
        raise NotFound(f"user '{user_id}' not found")


def _refuse_policy_name_taken_by_alias(name: str) -> None:
    if name in config_routing().aliases or Alias.objects.filter(name=name).exists():
        raise SpecError(
            f"'{name}' is already an alias: an alias and a policy would claim the same model "
            "name, leaving one dead. Rename the policy, or delete the alias and use its target "
            "as this policy's default"
        )


def _refuse_alias_name_taken_by_policy(name: str) -> None:
    if name in config_routing().policies or RoutingPolicy.objects.filter(name=name).exists():
        raise SpecError(
            f"'{name}' is already a routing policy: an alias resolves before a policy, so this "
            "would silently stop that policy taking effect. Rename the alias, or edit the policy"
        )


# --- aliases -----------------------------------------------------------------------------------


def alias_create(*, name: str, target: str, user_id: str | None = None) -> Alias:
    """Create the alias `name -> target` in its scope, or re-point the existing one."""
    uid = _scope(user_id)
    alias_policy(name, target, user_id=uid)  # SpecError: the name or target is wrong
    _require_user(uid)
    configured = config_routing().aliases.get(name)
    if not uid and configured is not None:
        raise SpecError(
            f"'{name}' is already an alias in the configuration "
            f"(-> '{configured.default_target}'); "
            "a configured alias wins over a global stored one, so this one would never be used. "
            "Rename it, scope it to a user, or edit the configuration"
        )
    _refuse_alias_name_taken_by_policy(name)
    try:
        with transaction.atomic():
            alias, _ = Alias.objects.update_or_create(
                name=name, user_id=uid, defaults={"target": target}
            )
    except IntegrityError:
        # Another writer created it between our read and our insert: theirs stands.
        raise Conflict(f"alias '{name}' was just created by another request; retry") from None
    return alias


def alias_delete(*, name: str, user_id: str | None = None) -> None:
    uid = _scope(user_id)
    deleted, _ = Alias.objects.filter(name=name, user_id=uid).delete()
    if not deleted:
        if not uid and name in config_routing().aliases:
            raise NotFound(f"alias '{name}' is in the configuration and cannot be deleted here")
        raise NotFound(f"alias '{name}' ({_describe_scope(uid)}) not found")


# --- policies ------------------------------------------------------------------------------------


def policy_save(
    *,
    name: str,
    spec: Any,
    user_id: str | None = None,
    rename_from: str | None = None,
) -> RoutingPolicy:
    """Create or replace the policy `name` in its scope. With `rename_from`, the stored
    policy of that name (which must exist: NotFound otherwise, never a create) becomes
    `name` with this spec, in one write, so a rename cannot land half-applied."""
    uid = _scope(user_id)
    policy = parse_policy(name, spec, user_id=uid)  # SpecError says why
    _require_user(uid)
    if not uid and name in config_routing().policies:
        raise SpecError(
            f"'{name}' is already a routing policy in the configuration; a configured policy "
            "wins over a global stored one, so this one would never be used. Rename it, scope "
            "it to a user, or edit the configuration"
        )
    _refuse_policy_name_taken_by_alias(name)
    lookup = rename_from if rename_from is not None else name
    try:
        with transaction.atomic():
            row = RoutingPolicy.objects.select_for_update().filter(name=lookup, user_id=uid).first()
            if rename_from is not None:
                if row is None:
                    if not uid and rename_from in config_routing().policies:
                        raise NotFound(
                            f"routing policy '{rename_from}' is in the configuration and "
                            "cannot be renamed here"
                        )
                    raise NotFound(
                        f"routing policy '{rename_from}' ({_describe_scope(uid)}) not found"
                    )
                if rename_from != name and (
                    RoutingPolicy.objects.filter(name=name, user_id=uid).exists()
                ):
                    raise Conflict(
                        f"routing policy '{name}' already exists in this scope; delete it "
                        "first or pick another name"
                    )
            if row is None:
                row = RoutingPolicy(name=name, user_id=uid)
            row.name = name
            row.spec = policy.spec
            row.save()
    except IntegrityError:
        raise Conflict(
            f"routing policy '{name}' was just created by another request; retry"
        ) from None
    return row


def policy_delete(*, name: str, user_id: str | None = None) -> None:
    uid = _scope(user_id)
    deleted, _ = RoutingPolicy.objects.filter(name=name, user_id=uid).delete()
    if not deleted:
        if not uid and name in config_routing().policies:
            raise NotFound(
                f"routing policy '{name}' is in the configuration and cannot be deleted here"
            )
        raise NotFound(f"routing policy '{name}' ({_describe_scope(uid)}) not found")
