"""Which policy a model name names, for one caller: configured and stored aliases and
policies, merged (docs/ROUTING.md).

Precedence is otari's (services/alias_service.py, services/policy_store.py), most
specific first: **a stored one scoped to the caller's user > the configuration's >
a stored global one**. The middle pair is a safety net (a global stored name that a
configured one would shadow is refused when written, store.py); the user-scoped layer
outranks both because overriding a shared name for one user is the point of scoping it.
Within a layer an alias answers before a policy, as in otari, though a name can never
be both (refused when written and at startup).

Cost: a name with ':' or '/' is a `provider:model` selector and never reaches routing
(`is_routing_name`). Any other name costs at most one statement: both tables, the
caller's scope and the global one, in one UNION (the configured layer is in memory).
Nothing is cached across requests, so a write takes effect on every process at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured

from common import pgpool
from common.config import GatewayConfig, gateway_config
from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing.spec import (
    Policy,
    SpecError,
    alias_policy,
    parse_policy,
    providers_unchecked,
)

logger = logging.getLogger(__name__)


def is_routing_name(name: str) -> bool:
    """Whether `name` could be an alias or policy (a selector has ':' or '/')."""
    return bool(name) and ":" not in name and "/" not in name


# --- the configured layer ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigRouting:
    aliases: dict[str, Policy]
    policies: dict[str, Policy]

    def get(self, name: str) -> Policy | None:
        return self.aliases.get(name) or self.policies.get(name)


_config_cache: tuple[GatewayConfig, ConfigRouting] | None = None


def _parse_config(config: GatewayConfig) -> ConfigRouting:
    aliases: dict[str, Policy] = {}
    for name, target in config.aliases.items():
        try:
            aliases[name] = alias_policy(name, target, source="config")
        except SpecError as exc:
            raise ImproperlyConfigured(f"aliases.{name}: {exc.message}") from None
    policies: dict[str, Policy] = {}
    for name, raw in config.routing_policies.items():
        if name in aliases:
            raise ImproperlyConfigured(
                f"routing.policies.{name}: collides with the alias of the same name "
                f"(aliases.{name}); both would claim the same model name"
            )
        try:
            policies[name] = parse_policy(name, raw, source="config")
        except SpecError as exc:
            raise ImproperlyConfigured(f"routing.policies.{name}: {exc.message}") from None
    return ConfigRouting(aliases=aliases, policies=policies)


def config_routing() -> ConfigRouting:
    """The configured aliases and policies, validated (ImproperlyConfigured says which
    one and why). Re-read when the configuration is (gateway_config.cache_clear)."""
    global _config_cache
    config = gateway_config()
    if _config_cache is None or _config_cache[0] is not config:
        _config_cache = (config, _parse_config(config))
    return _config_cache[1]


def check_config() -> None:
    """At startup (LlmProxyConfig.ready): refuse a configuration whose routing cannot work."""
    config_routing()


# --- stored rows -----------------------------------------------------------------------------


def stored_policy(*, kind: str, name: str, user_id: str, target: str, spec: Any) -> Policy | None:
    """A stored row as a Policy; None (logged) for a row this build cannot read, which
    then answers as if absent rather than failing every request that names it."""
    try:
        with providers_unchecked():
            if kind == "alias":
                return alias_policy(name, target, user_id=user_id)
            return parse_policy(name, spec, user_id=user_id)
    except SpecError as exc:
        logger.error("Stored %s %r (user %r) is not valid: %s", kind, name, user_id, exc.message)
        return None


def _pick(name: str, user_id: str, rows: list[dict[str, Any]]) -> Policy | None:
    # Layers in precedence order; aliases before policies within one.
    order = {("alias", True): 0, ("policy", True): 1, ("alias", False): 2, ("policy", False): 3}
    scoped = [r for r in rows if r["user_id"] == user_id and user_id]
    glob = [r for r in rows if r["user_id"] == ""]
    for row in sorted(scoped, key=lambda r: order[(r["kind"], True)]):
        policy = stored_policy(name=name, **row)
        if policy is not None:
            return policy
    configured = config_routing().get(name)
    if configured is not None:
        return configured
    for row in sorted(glob, key=lambda r: order[(r["kind"], False)]):
        policy = stored_policy(name=name, **row)
        if policy is not None:
            return policy
    return None


def _rows_orm(name: str, user_id: str) -> list[dict[str, Any]]:
    scopes = {user_id, ""}
    rows = [
        {"kind": "alias", "user_id": uid, "target": target, "spec": None}
        for uid, target in Alias.objects.filter(name=name, user_id__in=scopes).values_list(
            "user_id", "target"
        )
    ]
    rows += [
        {"kind": "policy", "user_id": uid, "target": "", "spec": spec}
        for uid, spec in RoutingPolicy.objects.filter(name=name, user_id__in=scopes).values_list(
            "user_id", "spec"
        )
    ]
    return rows


_LOOKUP_SQL = f"""
SELECT 'alias' AS kind, user_id, target, NULL::jsonb AS spec
  FROM {Alias._meta.db_table}
 WHERE name = %(name)s AND user_id IN (%(user_id)s, '')
UNION ALL
SELECT 'policy' AS kind, user_id, '' AS target, spec
  FROM {RoutingPolicy._meta.db_table}
 WHERE name = %(name)s AND user_id IN (%(user_id)s, '')
"""


def _needs_rows(name: str, user_id: str) -> bool:
    # A configured name outranks every global stored one: only a user-scoped row could
    # change the answer, and there is none to look for without a user.
    return bool(user_id) or config_routing().get(name) is None


def policy_lookup(name: str, *, user_id: str | None) -> Policy | None:
    """The policy (an alias is one) that `name` names for `user_id`, or None."""
    if not is_routing_name(name):
        return None
    uid = user_id or ""
    rows = _rows_orm(name, uid) if _needs_rows(name, uid) else []
    return _pick(name, uid, rows)


async def policy_lookup_async(name: str, *, user_id: str | None) -> Policy | None:
    """policy_lookup from the event loop: at most one statement, through the hot-path
    pool on PostgreSQL; none for a selector or a configured name without a user."""
    if not is_routing_name(name):
        return None
    uid = user_id or ""
    if not _needs_rows(name, uid):
        return _pick(name, uid, [])
    if pgpool.enabled():
        rows = await pgpool.fetchall(_LOOKUP_SQL, {"name": name, "user_id": uid})
    else:
        rows = await sync_to_async(_rows_orm)(name, uid)
    return _pick(name, uid, rows)
