"""Routing in standalone mode (docs/ROUTING.md): model names that are not `provider:model`
but an alias or a routing policy, which decide the ordered targets a request may be sent
to.

The request path (llm_proxy.pipeline.admission) asks two things of this package:

- `policy_lookup(name, user_id=...)`: the policy (an alias is a policy with a single
  `default`) that `name` names for this caller, or None when `name` is no policy;
- `plan(policy, context)`: the ordered targets for one request, which is what
  `explain` shows without dispatching anything.

and reports each attempt's outcome to `health`, which skips a target that keeps failing
for a cooldown (shared through Redis when it is configured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(frozen=True, slots=True)
class Context:
    """What a policy's `when` conditions and the allow-list see of one request."""

    user_id: str | None = None
    key_id: str | None = None
    # Percent of the caller's budget committed (spend + reserved), and USD left before
    # its cap; None when the caller has no cap (a budget condition then never matches).
    budget_used_pct: Decimal | None = None
    budget_remaining_usd: Decimal | None = None
    # The caller's allowed_models (None: any); the policy's own name in it allows every
    # target of the policy.
    allowed_models: list[str] | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """The targets of one request, in the order they are tried: the selected entry's
    (a weighted router's draw, without replacement), then `on_failure`'s, each once."""

    name: str
    # Why the head is there (otari's words): "condition:budget_used_pct" (a `when` entry,
    # naming its conditions), "router:weighted", "default", "on_failure" (everything the
    # selection chose was dropped); "none" when candidates is empty.
    selection_reason: str
    # "provider:model"; empty when the caller may use none of the policy's targets.
    candidates: list[str]
    # Targets left out, with why: "not_allowed" for this caller, "cooling_down",
    # "unresolvable" (its provider is no longer configured).
    dropped: list[tuple[str, str]] = field(default_factory=list)
    # A weighted router's shares in percent over the candidates this caller may use
    # (otari's explain `router_weights`); None when no router was reached.
    router_weights: dict[str, float] | None = None
    # Each candidate's own reason, parallel to `candidates` (what a usage row records as
    # its selection_reason).
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "selection_reason": self.selection_reason,
            "candidates": self.candidates,
            "dropped": [{"target": t, "reason": r} for t, r in self.dropped],
            "router_weights": self.router_weights,
        }


# The public surface (below the dataclasses: plan.py imports them from here).
from llm_proxy.routing.plan import plan  # noqa: E402
from llm_proxy.routing.registry import (  # noqa: E402
    is_routing_name,
    policy_lookup,
    policy_lookup_async,
)
from llm_proxy.routing.spec import Policy, SpecError  # noqa: E402

__all__ = [
    "Context",
    "Plan",
    "Policy",
    "SpecError",
    "is_routing_name",
    "plan",
    "policy_lookup",
    "policy_lookup_async",
]
