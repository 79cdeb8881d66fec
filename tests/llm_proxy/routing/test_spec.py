"""A policy spec is refused when it cannot work, with a message that says why (issue 15):
the same rules when saved through the API and at startup (otari's docs/routing.md)."""

from __future__ import annotations

import pytest

from llm_proxy.routing.spec import SpecError, alias_policy, check_name, parse_policy

DEFAULT = {"default": "openai:gpt-4o"}


def spec(*entries, on_failure=None):
    body = {"select": [*entries, DEFAULT]}
    if on_failure is not None:
        body["on_failure"] = on_failure
    return body


def weighted(candidates, weights):
    return {"router": "weighted", "candidates": candidates, "weights": weights}


def test_a_full_spec_parses_and_is_stored_normalised():
    raw = {
        "select": [
            {"when": {"budget_used_pct": {"gte": 80}, "key_id": "k1"}, "target": "openai:mini"},
            weighted(
                ["openai:gpt-4o", "anthropic:sonnet"], {"openai:gpt-4o": 3, "anthropic:sonnet": 1}
            ),
            {"default": "openai:gpt-4o"},
        ],
        "on_failure": ["anthropic:haiku"],
    }
    policy = parse_policy("tiered", raw)
    assert policy.spec == raw
    assert policy.default_target == "openai:gpt-4o"
    assert policy.is_dynamic
    assert policy.targets() == [
        "openai:mini",
        "openai:gpt-4o",
        "anthropic:sonnet",
        "anthropic:haiku",
    ]


REFUSALS = [
    (spec(), None, None),  # valid control, replaced below
    ({"select": [{"default": "gpt-4o"}]}, "must be of the form 'provider:model'"),
    ({"select": [{"default": "openai:"}]}, "must be of the form 'provider:model'"),
    (
        {"select": [{"default": "nowhere:gpt-4o"}]},
        "names provider 'nowhere', which is not configured",
    ),
    (
        {"select": [DEFAULT, {"when": {"user_id": "a"}, "target": "openai:x"}]},
        "select[1] comes after the `default` entry, so it could never be reached",
    ),
    (
        {"select": [{"when": {"user_id": "a"}, "target": "openai:x"}]},
        "select needs a final `default` entry",
    ),
    ({"select": []}, "select must be a non-empty list"),
    (
        spec({"when": {"budget_used_pct": {"gte": 100}}, "target": "openai:x"}),
        "budget_used_pct >= 100 can never match",
    ),
    (
        spec({"when": {"budget_used_pct": {"gt": 120}}, "target": "openai:x"}),
        "budget_used_pct > 120 can never match",
    ),
    (
        spec({"when": {"budget_used_pct": {"gte": 80, "lt": 90}}, "target": "openai:x"}),
        "needs exactly one of gte, gt, lte, lt",
    ),
    (
        spec({"when": {"budget_used_pct": {"ge": 80}}, "target": "openai:x"}),
        "unknown comparison 'ge'",
    ),
    (
        spec({"when": {"budget_used_pct": {"gte": "lots"}}, "target": "openai:x"}),
        "must be a number",
    ),
    (
        spec({"when": {"budget_usd_pct": {"gte": 80}}, "target": "openai:x"}),
        "unknown condition 'budget_usd_pct'",
    ),
    (spec({"when": {}, "target": "openai:x"}), "needs at least one condition"),
    (spec({"when": {"user_id": []}, "target": "openai:x"}), "user_id must be a non-empty"),
    (spec({"when": {"key_id": 7}, "target": "openai:x"}), "key_id must be a non-empty"),
    (spec({"target": "openai:x"}), "a `target` entry needs a `when`"),
    (spec({"when": {"user_id": "a"}, "taget": "openai:x"}), "unknown key 'taget'"),
    ({"select": [{"default": "openai:x", "when": {"user_id": "a"}}]}, "cannot carry a `when`"),
    ({"select": [DEFAULT], "onfailure": []}, "unknown key 'onfailure'"),
    (spec(weighted([], {"openai:a": 1})), "needs a non-empty `candidates` list"),
    (spec(weighted(["openai:a"], {"openai:a": 1})), "at least 2 candidates"),
    (
        spec(weighted(["openai:a", "openai:b"], {"openai:a": 1, "openai:c": 1})),
        "weights names 'openai:c', which is not a candidate",
    ),
    (
        spec(weighted(["openai:a", "openai:b"], {"openai:a": 0, "openai:b": 0})),
        "every weight is 0",
    ),
    (
        spec(weighted(["openai:a", "openai:b"], {"openai:a": -1, "openai:b": 2})),
        "weights.openai:a must not be negative",
    ),
    (spec(weighted(["openai:a", "openai:b"], {})), "needs `weights`"),
    (spec({"router": "knn", "candidates": ["openai:a", "openai:b"]}), "unknown router 'knn'"),
    (
        spec({"when": {"user_id": "a"}, "target": "openai:x", "weights": {}}),
        "belong to a `router` entry only",
    ),
    (spec(on_failure=["openai:gpt-4o"]), "is both the default target and in on_failure"),
    (spec(on_failure=["anthropic:a", "anthropic:a"]), "on_failure lists a target twice"),
    (
        spec(on_failure=[f"anthropic:m{i}" for i in range(5)]),
        "at most 5 candidates",
    ),
    ("select: []", "must be a mapping"),
][1:]


@pytest.mark.parametrize(("raw", "message"), REFUSALS)
def test_a_spec_that_cannot_work_is_refused_saying_why(raw, message):
    with pytest.raises(SpecError) as refused:
        parse_policy("p", raw)
    assert message in refused.value.message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must be a non-empty string"),
        ("openai:gpt-4o", "must not contain ':' or '/'"),
        ("team/fast", "must not contain ':' or '/'"),
        ("x" * 256, "longer than 255"),
        ("openai", "collides with a configured provider"),
        (" fast", "whitespace"),
    ],
)
def test_a_name_that_would_shadow_a_selector_is_refused(name, message):
    with pytest.raises(SpecError) as refused:
        check_name(name)
    assert message in refused.value.message
    assert check_name("x" * 255) == "x" * 255


def test_an_alias_is_a_policy_with_a_single_default():
    alias = alias_policy("fast", "openai:gpt-4o-mini")
    assert [e.kind for e in alias.select] == ["default"]
    assert alias.default_target == "openai:gpt-4o-mini"
    assert alias.kind == "alias"
    assert not alias.is_dynamic
    with pytest.raises(SpecError, match="not configured"):
        alias_policy("fast", "nowhere:model")


def test_the_default_joins_a_router_pool_and_may_be_weighted():
    policy = parse_policy(
        "split",
        spec(weighted(["openai:a", "anthropic:b"], {"openai:a": 1, "openai:gpt-4o": 1})),
    )
    assert policy.select[0].candidates == ("openai:a", "anthropic:b", "openai:gpt-4o")
    # The stored spec keeps the pool as declared.
    assert policy.spec["select"][0]["candidates"] == ["openai:a", "anthropic:b"]
