"""explain (issue 15): the plan a policy gives a simulated caller, with the live health
state, dispatching nothing; otari's response shape."""

from __future__ import annotations

import pytest

from llm_proxy.routing import health
from llm_proxy.routing.explain import explain
from llm_proxy.routing.spec import SpecError
from llm_proxy.routing.store import NotFound, policy_save
from tests.conftest import run_async

BALANCED = {
    "select": [
        {
            "router": "weighted",
            "candidates": ["anthropic:b", "openai:a"],
            "weights": {"openai:a": 70, "anthropic:b": 30},
        },
        {"default": "openai:a"},
    ],
    "on_failure": ["anthropic:c"],
}


def candidate(position, target, reason):
    provider, _, model = target.partition(":")
    return {
        "position": position,
        "target": target,
        "provider": provider,
        "model": model,
        "selection_reason": reason,
    }


@pytest.mark.django_db
def test_a_stored_weighted_policy_shows_its_split_heaviest_first():
    policy_save(name="balanced", spec=BALANCED)
    assert explain(name="balanced") == {
        "name": "balanced",
        "selection_reason": "router:weighted",
        "is_dynamic": True,
        "candidates": [
            candidate(1, "openai:a", "router:weighted"),
            candidate(2, "anthropic:b", "router:weighted"),
            candidate(3, "anthropic:c", "on_failure"),
        ],
        "dropped": [],
        "router_weights": {"anthropic:b": 30.0, "openai:a": 70.0},
    }


@pytest.mark.django_db
def test_an_allow_list_and_a_cooldown_show_as_dropped_with_reasons(settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 1
    run_async(health.record("anthropic:c", ok=False))
    result = explain(spec=BALANCED, name="draft", allowed_models=["anthropic:*"])
    assert result["candidates"] == [candidate(1, "anthropic:b", "router:weighted")]
    assert result["router_weights"] == {"anthropic:b": 100.0}
    not_allowed, cooling = result["dropped"]
    assert not_allowed == {
        "target": "openai:a",
        "reason": "not_allowed",
        "detail": "is not in allowed_models for this caller",
    }
    assert (cooling["target"], cooling["reason"]) == ("anthropic:c", "cooling_down")
    assert cooling["detail"].startswith("is cooling down after repeated failures, until 20")

    # Every allowed target cooling down: the last is still tried.
    run_async(health.record("anthropic:b", ok=False))
    result = explain(spec=BALANCED, allowed_models=["anthropic:*"])
    assert result["candidates"] == [candidate(1, "anthropic:c", "on_failure")]
    assert result["selection_reason"] == "on_failure"
    assert [(d["target"], d["reason"]) for d in result["dropped"]] == [
        ("openai:a", "not_allowed"),
        ("anthropic:b", "cooling_down"),
    ]


@pytest.mark.django_db
def test_budget_conditions_are_simulated():
    tiered = {
        "select": [
            {"when": {"budget_used_pct": {"gte": 80}}, "target": "openai:nano"},
            {"default": "openai:mini"},
        ]
    }
    assert explain(spec=tiered, budget_used_pct=85)["candidates"][0]["target"] == "openai:nano"
    assert explain(spec=tiered, budget_used_pct="79.9")["selection_reason"] == "default"
    assert explain(spec=tiered)["selection_reason"] == "default"


@pytest.mark.django_db
def test_explain_refusals():
    with pytest.raises(SpecError, match="pass `spec`"):
        explain()
    with pytest.raises(NotFound, match="'nope' not found"):
        explain(name="nope")
    with pytest.raises(SpecError, match="budget_used_pct must be a number"):
        explain(spec=BALANCED, budget_used_pct="lots")
    with pytest.raises(SpecError, match="every weight is 0"):
        explain(
            spec={
                **BALANCED,
                "select": [
                    {**BALANCED["select"][0], "weights": {"openai:a": 0}},
                    BALANCED["select"][1],
                ],
            }
        )
