"""`manage.py routing_explain` (issue 15): otari's `otari routing explain` output, for
configured and stored policies, with simulated budgets, keys and allow-lists."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from llm_proxy.routing import health
from llm_proxy.routing.store import policy_save
from tests.conftest import run_async
from tests.factories import make_user
from tests.routing_config import routing_configured

pytestmark = pytest.mark.django_db

WEIGHTED_NOTE = (
    "  weighted: one candidate is drawn per request in proportion to its share, and a "
    "candidate that fails before responding falls to the next draw before on_failure. "
    "Shares are normalized over the candidates this caller may use."
)


@pytest.fixture(autouse=True)
def configured(gateway_config_file: Path, tmp_path: Path):
    with routing_configured(gateway_config_file, tmp_path) as path:
        yield path


def explain(*args: str) -> str:
    out = StringIO()
    call_command("routing_explain", *args, stdout=out)
    return out.getvalue()


def test_a_weighted_policy_shows_its_split():
    assert explain("balanced").splitlines() == [
        "balanced: 3 candidate(s), selected by router:weighted",
        "  1. openai:gpt-4o    [weighted 75%]  dispatches as openai:gpt-4o",
        "  2. anthropic:claude-sonnet-4-5    [weighted 25%]  "
        "dispatches as anthropic:claude-sonnet-4-5",
        "  3. openai:gpt-4o-mini    [on_failure]  dispatches as openai:gpt-4o-mini",
        WEIGHTED_NOTE,
    ]


def test_an_allow_list_drops_targets_with_the_reason():
    assert explain("balanced", "--allowed-model", "anthropic:*").splitlines() == [
        "balanced: 1 candidate(s), selected by router:weighted",
        "  1. anthropic:claude-sonnet-4-5    [weighted 100%]  "
        "dispatches as anthropic:claude-sonnet-4-5",
        "  x  openai:gpt-4o    dropped: is not in allowed_models for this caller",
        "  x  openai:gpt-4o-mini    dropped: is not in allowed_models for this caller",
        WEIGHTED_NOTE,
    ]


def test_a_budget_tier_at_its_threshold():
    assert explain("thrifty", "--budget-used-pct", "79.9").splitlines() == [
        "thrifty: 2 candidate(s), selected by default",
        "  1. openai:gpt-4o    [default]  dispatches as openai:gpt-4o",
        "  2. anthropic:claude-haiku-4-5    [on_failure]  dispatches as anthropic:claude-haiku-4-5",
    ]
    assert explain("thrifty", "--budget-used-pct", "80").splitlines()[:2] == [
        "thrifty: 2 candidate(s), selected by condition:budget_used_pct",
        "  1. openai:gpt-4o-mini    [condition:budget_used_pct]  dispatches as openai:gpt-4o-mini",
    ]


def test_stored_user_scoped_policies_and_key_conditions():
    make_user(user_id="alice")
    policy_save(
        name="mine",
        user_id="alice",
        spec={
            "select": [
                {"when": {"key_id": "ci-key"}, "target": "anthropic:claude-haiku-4-5"},
                {"when": {"budget_remaining_usd": {"lt": 1}}, "target": "openai:gpt-4o-mini"},
                {"default": "openai:gpt-4o"},
            ]
        },
    )
    assert explain("mine", "--user-id", "alice", "--key-id", "ci-key").splitlines()[0] == (
        "mine: 1 candidate(s), selected by condition:key_id"
    )
    assert explain("mine", "--user", "alice", "--budget-remaining-usd", "0.5").splitlines() == [
        "mine: 1 candidate(s), selected by condition:budget_remaining_usd",
        "  1. openai:gpt-4o-mini    [condition:budget_remaining_usd]  "
        "dispatches as openai:gpt-4o-mini",
    ]
    # Scoped to alice: nobody else resolves it.
    with pytest.raises(CommandError, match="unknown policy 'mine'"):
        explain("mine")


def test_a_target_cooling_down_is_dropped_with_when_it_comes_back(settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 1
    run_async(health.record("openai:gpt-4o", ok=False))
    lines = explain("thrifty").splitlines()
    assert lines[:2] == [
        "thrifty: 1 candidate(s), selected by on_failure",
        "  1. anthropic:claude-haiku-4-5    [on_failure]  dispatches as anthropic:claude-haiku-4-5",
    ]
    assert lines[2].startswith(
        "  x  openai:gpt-4o    dropped: is cooling down after repeated failures, until "
    )


def test_no_usable_candidate_exits_1():
    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("routing_explain", "house", "--allowed-model", "anthropic:*", stdout=out)
    assert exited.value.code == 1
    assert out.getvalue().splitlines() == [
        "house: NO USABLE CANDIDATE",
        "  x  openai:gpt-4o-mini    dropped: is not in allowed_models for this caller",
    ]


def test_without_a_name_it_lists_what_is_in_force():
    policy_save(name="cheap", spec={"select": [{"default": "openai:gpt-4o-mini"}]})
    assert explain().splitlines() == [
        "Policies and aliases:",
        "  balanced  (router:weighted, 3 candidate(s), config, global)",
        "  cheap  (static, 1 candidate(s), stored, global)",
        "  house  (alias, 1 candidate(s), config, global)",
        "  thrifty  (dynamic, 3 candidate(s), config, global)",
        "",
        "Pass a name to see its plan.",
    ]


def test_bad_arguments_are_refused():
    with pytest.raises(CommandError, match=r"unknown policy .nope.\. Policies and aliases: bal"):
        explain("nope")
    with pytest.raises(CommandError, match="expected a number"):
        explain("thrifty", "--budget-used-pct", "lots")
