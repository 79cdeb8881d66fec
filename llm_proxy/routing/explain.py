"""What a policy would do for a caller, dispatching nothing (`POST
/v1/routing/policies/explain`, `manage.py routing_explain`; otari's `routing explain`).

The plan of plan(), with the live health state (a target cooling down shows as dropped,
with when it comes back) and, for a weighted router, the split rather than one draw:
explain has no request to draw for, so the candidates are shown heaviest share first
(ties in declared order), as otari does, and the output does not change between calls.

The response (otari's shape, in this gateway's words: a target is `provider:model`):

    {"name", "selection_reason", "is_dynamic",
     "candidates": [{"position", "target", "provider", "model", "selection_reason"}],
     "dropped": [{"target", "reason", "detail"}],
     "router_weights": {target: percent} | null}
"""

from __future__ import annotations

import random
from datetime import datetime
from decimal import Decimal
from typing import Any

from llm_proxy.routing import Context, health
from llm_proxy.routing.plan import COOLING_DOWN, NOT_ALLOWED, UNRESOLVABLE, plan, shares_pct
from llm_proxy.routing.registry import policy_lookup
from llm_proxy.routing.spec import Policy, SpecError, parse_policy
from llm_proxy.routing.store import NotFound

_DETAILS = {
    NOT_ALLOWED: "is not in allowed_models for this caller",
    UNRESOLVABLE: "names a provider that is no longer configured",
}


class _Heaviest(random.Random):
    """A draw that always lands at the start of the range: the weighted ordering it
    produces is heaviest first, ties in declared order (the split, not one roll)."""

    def random(self) -> float:
        return 0.0


def _sorted_by_weight(policy: Policy) -> Policy:
    entries = []
    for entry in policy.select:
        if entry.kind == "router":
            shares = shares_pct(entry.candidates, entry.weights)
            order = {t: i for i, t in enumerate(entry.candidates)}
            pool = tuple(sorted(entry.candidates, key=lambda t: (-shares[t], order[t])))
            entry = type(entry)(
                kind=entry.kind, router=entry.router, candidates=pool, weights=entry.weights
            )
        entries.append(entry)
    return Policy(
        name=policy.name,
        select=tuple(entries),
        on_failure=policy.on_failure,
        user_id=policy.user_id,
        source=policy.source,
        kind=policy.kind,
        spec=policy.spec,
    )


def _number(value: Any, field: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecError(f"{field} must be a number")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise SpecError(f"{field} must be a number") from None
    if not number.is_finite():
        raise SpecError(f"{field} must be a finite number")
    return number


def explain(
    *,
    name: str | None = None,
    spec: Any = None,
    user_id: str | None = None,
    key_id: str | None = None,
    budget_used_pct: Any = None,
    budget_remaining_usd: Any = None,
    allowed_models: list[str] | None = None,
) -> dict[str, Any]:
    """The plan of the policy `name` (as `user_id` resolves it) or of a draft `spec`
    (which wins when both are given; `name` then labels it), for the simulated caller.

    SpecError: neither given, or the draft or a number is not valid (400); NotFound: no
    policy or alias has that name for this user (404)."""
    if name is None and spec is None:
        raise SpecError("pass `spec` (a draft to check), `name` (an existing policy), or both")
    if allowed_models is not None and (
        not isinstance(allowed_models, list) or not all(isinstance(m, str) for m in allowed_models)
    ):
        raise SpecError("allowed_models must be a list of strings")
    context = Context(
        user_id=user_id or None,
        key_id=key_id or None,
        budget_used_pct=_number(budget_used_pct, "budget_used_pct"),
        budget_remaining_usd=_number(budget_remaining_usd, "budget_remaining_usd"),
        allowed_models=allowed_models,
    )
    if spec is not None:
        policy = parse_policy(name or "draft", spec, user_id=user_id or "")
    else:
        found = policy_lookup(name or "", user_id=user_id)
        if found is None:
            raise NotFound(f"routing policy '{name}' not found")
        policy = found

    cooling = health.cooling_sync(policy.targets())
    result = plan(_sorted_by_weight(policy), context, cooling=cooling, rng=_Heaviest())
    return {
        "name": name or "draft",
        "selection_reason": result.selection_reason,
        "is_dynamic": policy.is_dynamic,
        "candidates": [
            {
                "position": position,
                "target": target,
                "provider": target.partition(":")[0],
                "model": target.partition(":")[2],
                "selection_reason": reason,
            }
            for position, (target, reason) in enumerate(
                zip(result.candidates, result.reasons, strict=True), start=1
            )
        ],
        "dropped": [
            {"target": target, "reason": reason, "detail": _detail(reason, cooling.get(target))}
            for target, reason in result.dropped
        ],
        "router_weights": result.router_weights,
    }


def _detail(reason: str, until: datetime | None) -> str:
    if reason == COOLING_DOWN and until is not None:
        return f"is cooling down after repeated failures, until {until.isoformat()}"
    return _DETAILS.get(reason, reason)
