"""Show what a routing policy (or alias) would do, dispatching nothing: the targets in
the order they are tried, why the first was selected, and each target left out with
why (not allowed for the caller, cooling down after failures). Without NAME, list the
policies and aliases in force. otari's `otari routing explain`, same output:

    balanced: 3 candidate(s), selected by router:weighted
      1. openai:gpt-4o    [weighted 75%]  dispatches as openai:gpt-4o
      2. anthropic:claude-sonnet-4-5    [weighted 25%]  dispatches as anthropic:claude-sonnet-4-5
      3. openai:gpt-4o-mini    [on_failure]  dispatches as openai:gpt-4o-mini

Unlike otari's (which reads config.yml only), this one also sees stored policies: it
reads the database, as `POST /v1/routing/policies/explain` does. The budget options
exercise a tier-down rule without waiting for real spend to cross its threshold.
Exit status 1 when the caller described could use none of the policy's targets.
"""

from __future__ import annotations

import argparse
from argparse import ArgumentParser
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm_proxy import selectors
from llm_proxy.routing import store
from llm_proxy.routing.explain import explain
from llm_proxy.routing.registry import policy_lookup
from llm_proxy.routing.spec import SpecError


def number(value: str) -> Decimal:
    try:
        parsed = Decimal(value.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError("expected a number, such as 85 or 12.50") from None
    if not parsed.is_finite():
        raise argparse.ArgumentTypeError("expected a finite number")
    return parsed


def plan_lines(result: dict[str, Any], *, weighted: bool) -> list[str]:
    """explain()'s answer in otari's `routing explain` layout."""
    name = result["name"]
    if not result["candidates"]:
        lines = [f"{name}: NO USABLE CANDIDATE"]
    else:
        lines = [
            f"{name}: {len(result['candidates'])} candidate(s), "
            f"selected by {result['selection_reason']}"
        ]
    shares = result["router_weights"] or {}
    for candidate in result["candidates"]:
        target = candidate["target"]
        label = (
            f"weighted {shares[target]:.0f}%" if target in shares else candidate["selection_reason"]
        )
        lines.append(f"  {candidate['position']}. {target}    [{label}]  dispatches as {target}")
    lines += [f"  x  {d['target']}    dropped: {d['detail']}" for d in result["dropped"]]
    if weighted:
        lines.append(
            "  weighted: one candidate is drawn per request in proportion to its share, and "
            "a candidate that fails before responding falls to the next draw before "
            "on_failure. Shares are normalized over the candidates this caller may use."
            if shares
            else "  weighted: no candidate in the split is usable by this caller, so the "
            "plan above is whatever the failure chain leaves."
        )
    return lines


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME", nargs="?", help="a policy or alias")
        parser.add_argument(
            "--user-id", "--user", dest="user_id", help="resolve the name and match as this user"
        )
        parser.add_argument("--key-id", help="match `key_id` conditions as this API key id")
        parser.add_argument(
            "--budget-used-pct",
            type=number,
            metavar="N",
            help="pretend this percent of the caller's budget is committed",
        )
        parser.add_argument(
            "--budget-remaining-usd",
            type=number,
            metavar="X",
            help="pretend this much USD is left before the cap",
        )
        parser.add_argument(
            "--allowed-model",
            dest="allowed_models",
            action="append",
            metavar="PATTERN",
            help="restrict to these provider:model entries (repeatable), as an API key's "
            "allowed_models would",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        if name is None:
            self._list()
            return
        policy = policy_lookup(name, user_id=options["user_id"])
        if policy is None:
            known = ", ".join(sorted({e.name for e in self._entries()})) or "none"
            raise CommandError(f"unknown policy {name!r}. Policies and aliases: {known}")
        try:
            result = explain(
                name=name,
                user_id=options["user_id"],
                key_id=options["key_id"],
                budget_used_pct=options["budget_used_pct"],
                budget_remaining_usd=options["budget_remaining_usd"],
                allowed_models=options["allowed_models"],
            )
        except (SpecError, store.NotFound) as exc:
            raise CommandError(exc.message) from None
        self.stdout.write("\n".join(plan_lines(result, weighted=_has_router(policy))))
        if not result["candidates"]:
            raise SystemExit(1)

    def _entries(self) -> list[selectors.RoutingEntry]:
        return [*selectors.policy_list(), *selectors.alias_list()]

    def _list(self) -> None:
        entries = self._entries()
        if not entries:
            self.stdout.write(
                "No routing policies or aliases: add `routing.policies` or `aliases` to "
                "OTARI_CONFIG, or POST /v1/routing/policies."
            )
            return
        self.stdout.write("Policies and aliases:")
        for entry in sorted(entries, key=lambda e: (e.name, e.user_id or "")):
            policy = entry.policy
            if policy is None:
                self.stdout.write(f"  {entry.name}  ({entry.source}, {entry.scope}, NOT VALID)")
                continue
            if entry.kind == "alias":
                shape = "alias"
            elif _has_router(policy):
                shape = "router:weighted"
            else:
                shape = "dynamic" if policy.is_dynamic else "static"
            self.stdout.write(
                f"  {entry.name}  ({shape}, {len(policy.targets())} candidate(s), "
                f"{entry.source}, {entry.scope})"
            )
        self.stdout.write("\nPass a name to see its plan.")


def _has_router(policy: Any) -> bool:
    return any(entry.kind == "router" for entry in policy.select)
