"""One request's plan (issue 15): budget tiers at the threshold, the weighted split and
its draw without replacement, the allow-list, cooldowns, and each target once."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

from llm_proxy.routing import Context, plan
from llm_proxy.routing.spec import parse_policy

SOON = datetime(2030, 1, 1, tzinfo=UTC)


def tiered():
    return parse_policy(
        "thrifty",
        {
            "select": [
                {"when": {"budget_used_pct": {"gte": 80}}, "target": "openai:nano"},
                {"when": {"budget_remaining_usd": {"lt": 1}}, "target": "openai:micro"},
                {"when": {"user_id": ["vip", "ops"], "key_id": "k1"}, "target": "anthropic:opus"},
                {"default": "openai:mini"},
            ],
            "on_failure": ["anthropic:haiku"],
        },
    )


def split():
    return parse_policy(
        "balanced",
        {
            "select": [
                {
                    "router": "weighted",
                    "candidates": ["openai:a", "anthropic:b", "openai:drained"],
                    "weights": {"openai:a": 3, "anthropic:b": 1},
                },
                {"default": "openai:a"},
            ],
            "on_failure": ["dead:c"],
        },
    )


def test_a_budget_tier_switches_at_its_threshold_and_never_without_a_cap():
    below = plan(tiered(), Context(budget_used_pct=Decimal("79.999")))
    at = plan(tiered(), Context(budget_used_pct=Decimal("80")))
    no_cap = plan(tiered(), Context(budget_used_pct=None, budget_remaining_usd=None))
    assert below.candidates == ["openai:mini", "anthropic:haiku"]
    assert below.selection_reason == "default"
    assert at.candidates == ["openai:nano", "anthropic:haiku"]
    assert (at.selection_reason, at.reasons) == (
        "condition:budget_used_pct",
        ["condition:budget_used_pct", "on_failure"],
    )
    assert no_cap.candidates[0] == "openai:mini"
    remaining = plan(tiered(), Context(budget_remaining_usd=Decimal("0.99")))
    assert remaining.candidates[0] == "openai:micro"
    assert plan(tiered(), Context(budget_remaining_usd=Decimal("1"))).candidates[0] == "openai:mini"


def test_every_condition_of_an_entry_must_match():
    assert plan(tiered(), Context(user_id="vip", key_id="k1")).candidates[0] == "anthropic:opus"
    assert plan(tiered(), Context(user_id="vip", key_id="k2")).candidates[0] == "openai:mini"
    assert plan(tiered(), Context(user_id="ops", key_id="k1")).selection_reason == (
        "condition:user_id,key_id"
    )


def test_the_weighted_split_is_three_to_one_over_many_seeded_draws():
    rng = random.Random(15)
    heads = Counter(plan(split(), Context(), rng=rng).candidates[0] for _ in range(4000))
    # 3:1 -> 3000 expected; 4 standard deviations is ±110.
    assert 2890 <= heads["openai:a"] <= 3110
    assert heads["openai:a"] + heads["anthropic:b"] == 4000  # the drained one never heads


def test_the_weighted_split_holds_unseeded_too():
    heads = Counter(plan(split(), Context()).candidates[0] for _ in range(2000))
    # 1500 expected, sd ~19.4: ±6 sd, so a correct split fails once in a billion runs.
    assert 1384 <= heads["openai:a"] <= 1616


def test_the_draw_is_without_replacement_then_the_zero_weight_tail_then_on_failure():
    for seed in range(50):
        result = plan(split(), Context(), rng=random.Random(seed))
        assert sorted(result.candidates[:2]) == ["anthropic:b", "openai:a"]
        assert result.candidates[2:] == ["openai:drained", "dead:c"]
        assert result.reasons == ["router:weighted"] * 3 + ["on_failure"]
        assert result.router_weights == {
            "openai:a": 75.0,
            "anthropic:b": 25.0,
            "openai:drained": 0.0,
        }


def test_the_allow_list_drops_targets_and_renormalises_the_split():
    result = plan(split(), Context(allowed_models=["anthropic:*", "dead:*"]))
    assert result.candidates == ["anthropic:b", "dead:c"]
    assert result.dropped == [("openai:a", "not_allowed"), ("openai:drained", "not_allowed")]
    assert result.router_weights == {"anthropic:b": 100.0}
    # The policy's own name allows every target it has.
    assert plan(split(), Context(allowed_models=["balanced"])).dropped == []


def test_nothing_allowed_is_an_empty_plan():
    result = plan(tiered(), Context(allowed_models=["gemini:*"]))
    assert result.candidates == []
    assert result.selection_reason == "none"
    assert [reason for _, reason in result.dropped] == ["not_allowed", "not_allowed"]


def test_a_selected_target_that_is_dropped_leaves_the_failure_chain_at_the_head():
    result = plan(tiered(), Context(allowed_models=["anthropic:haiku"]))
    assert (result.candidates, result.selection_reason) == (["anthropic:haiku"], "on_failure")


def test_cooling_targets_are_dropped_but_when_all_are_cooling_the_last_is_kept():
    cooling = {"openai:mini": SOON}
    result = plan(tiered(), Context(), cooling=cooling)
    assert result.candidates == ["anthropic:haiku"]
    assert result.dropped == [("openai:mini", "cooling_down")]
    every = plan(tiered(), Context(), cooling=frozenset({"openai:mini", "anthropic:haiku"}))
    assert every.candidates == ["anthropic:haiku"]
    assert every.dropped == [("openai:mini", "cooling_down")]


def test_each_target_is_tried_once():
    policy = parse_policy(
        "p",
        {
            "select": [
                {"when": {"user_id": "u"}, "target": "anthropic:x"},
                {"default": "openai:y"},
            ],
            "on_failure": ["anthropic:x"],
        },
    )
    assert plan(policy, Context(user_id="u")).candidates == ["anthropic:x"]


def test_a_target_whose_provider_was_removed_is_dropped_as_unresolvable():
    from llm_proxy.routing.spec import providers_unchecked

    with providers_unchecked():
        policy = parse_policy(
            "old", {"select": [{"default": "gone:m"}], "on_failure": ["openai:x"]}
        )
    assert plan(policy, Context()).dropped == [("gone:m", "unresolvable")]
