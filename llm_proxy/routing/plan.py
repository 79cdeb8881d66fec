"""One request's plan: the targets a policy sends it to, in the order they are tried.

Pure and synchronous: what it needs about the request arrives in the Context, the
health state as `cooling`, randomness as `rng`; it reads no database and calls nothing.

1. Selection (otari's): the first `when` entry whose conditions all hold (a budget
   condition never holds when the number is None: no cap), else a weighted router's
   draw, else the `default`. A router's draw is its whole ordering: candidates drawn one
   after another by weight without replacement, so a failure stays in the pool before
   `on_failure` is reached; a zero-weight candidate is never drawn and sits at the tail
   in declared order (a drained provider still backs up a failure).
2. Then `on_failure` in order; each target once.
3. Dropped, each with its reason: a target whose provider is no longer configured
   ("unresolvable"), one the caller may not use ("not_allowed"; the policy's own name
   in allowed_models allows all its targets), and one cooling down ("cooling_down") —
   except that when every allowed target is cooling down the last one stays, so the
   request still tries something rather than failing untried.

`router_weights` are otari's: percent of the draw per allowed candidate, normalised
over the candidates the caller may use (not narrowed by cooling, which is transient).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from decimal import Decimal

from common.config import gateway_config
from llm_proxy.auth import model_allowed
from llm_proxy.routing import Context, Plan
from llm_proxy.routing.spec import Entry, Policy, When

# One stream per process (otari's): per-request Random() would reseed from the OS each
# time. Not locked: a worker's event loop runs one draw at a time.
_RNG = random.Random()  # noqa: S311 - a traffic split, not a secret

NOT_ALLOWED = "not_allowed"
COOLING_DOWN = "cooling_down"
UNRESOLVABLE = "unresolvable"


def _matches(when: When, context: Context) -> bool:
    if when.budget_used_pct is not None and (
        context.budget_used_pct is None
        or not when.budget_used_pct.matches(Decimal(context.budget_used_pct))
    ):
        return False
    if when.budget_remaining_usd is not None and (
        context.budget_remaining_usd is None
        or not when.budget_remaining_usd.matches(Decimal(context.budget_remaining_usd))
    ):
        return False
    if when.user_id is not None and context.user_id not in when.user_id:
        return False
    return not (when.key_id is not None and context.key_id not in when.key_id)


def weighted_ordering(
    pool: Sequence[str], weights: Mapping[str, Decimal], rng: random.Random
) -> list[str]:
    """`pool` by repeated weighted draw without replacement; zero weights at the tail."""
    remaining = [t for t in pool if weights.get(t, 0) > 0]
    tail = [t for t in pool if not weights.get(t, 0) > 0]
    ordered: list[str] = []
    while remaining:
        total = sum(float(weights[t]) for t in remaining)
        draw = rng.random() * total
        picked = remaining[-1]  # float drift past the last boundary
        for target in remaining:
            draw -= float(weights[target])
            if draw < 0:
                picked = target
                break
        ordered.append(picked)
        remaining.remove(picked)
    return ordered + tail


def shares_pct(pool: Sequence[str], weights: Mapping[str, Decimal]) -> dict[str, float]:
    """Percent of the draw each of `pool` gets (an all-zero pool: its head serves all)."""
    total = sum((weights.get(t, Decimal(0)) for t in pool), Decimal(0))
    if not pool:
        return {}
    if total <= 0:
        return {t: 100.0 if i == 0 else 0.0 for i, t in enumerate(pool)}
    return {t: round(float(weights.get(t, 0) * 100 / total), 2) for t in pool}


def _select(
    policy: Policy, context: Context, allowed: list[str] | None, rng: random.Random
) -> tuple[str, list[tuple[str, str]], dict[str, float] | None]:
    """(selection_reason, [(target, its reason)], router_weights)."""
    for entry in policy.select:
        if entry.kind == "when" and entry.when is not None and _matches(entry.when, context):
            reason = "condition:" + ",".join(entry.when.conditions())
            return reason, [(entry.target, reason)], None
        if entry.kind == "router":
            return _route(entry, allowed, rng)
        if entry.kind == "default":
            return "default", [(entry.target, "default")], None
    raise AssertionError("a parsed policy ends with a default entry")  # pragma: no cover


def _route(
    entry: Entry, allowed: list[str] | None, rng: random.Random
) -> tuple[str, list[tuple[str, str]], dict[str, float] | None]:
    reason = f"router:{entry.router}"
    # The draw is over what this caller may use: a disallowed heavy candidate must not
    # eat the draws and push every request down to the failure path.
    usable = [t for t in entry.candidates if model_allowed(allowed, t)]
    ordered = weighted_ordering(usable, entry.weights, rng)
    ordered += [t for t in entry.candidates if t not in usable]  # dropped below, with why
    weights = shares_pct(usable, entry.weights) if usable else None
    return reason, [(t, reason) for t in ordered], weights


def plan(
    policy: Policy,
    context: Context,
    *,
    cooling: Mapping[str, datetime] | Collection[str] = frozenset(),
    rng: random.Random | None = None,
) -> Plan:
    """The ordered targets of one request under `policy` (see the module docstring).
    Empty `candidates` when the caller may use none of them (the request path's 403)."""
    allowed = context.allowed_models
    if allowed is not None and policy.name in allowed:
        allowed = None  # the policy's name allows every target it has
    _, selected, router_weights = _select(policy, context, allowed, rng or _RNG)
    ordered = [*selected, *((t, "on_failure") for t in policy.on_failure)]

    providers = gateway_config().providers
    kept: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for target, reason in ordered:
        if target in seen:
            continue
        seen.add(target)
        if target.partition(":")[0] not in providers:
            dropped.append((target, UNRESOLVABLE))
        elif not model_allowed(allowed, target):
            dropped.append((target, NOT_ALLOWED))
        else:
            kept.append((target, reason))

    warm = [(t, r) for t, r in kept if t not in cooling]
    if kept and not warm:
        # Every target is cooling down: try the last rather than fail untried.
        warm = [kept[-1]]
    dropped += [(t, COOLING_DOWN) for t, _ in kept if (t, _) not in warm]

    return Plan(
        name=policy.name,
        selection_reason=warm[0][1] if warm else "none",
        candidates=[t for t, _ in warm],
        dropped=dropped,
        router_weights=router_weights,
        reasons=[r for _, r in warm],
    )
