"""Aliases and routing policies over HTTP with the master key (issue 15, docs/ROUTING.md,
docs/API.md "Routing"): otari's routes, shapes and status codes, under /v1 and /api/v1;
configured ones listed and read-only; explain dispatching nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing import health
from tests.conftest import run_async
from tests.factories import make_user
from tests.routing_config import routing_configured

TIERED = {
    "select": [
        {"when": {"budget_used_pct": {"gte": 80}}, "target": "openai:gpt-4o-mini"},
        {"default": "openai:gpt-4o"},
    ],
    "on_failure": ["anthropic:claude-haiku-4-5"],
}
FAILOVER = {"select": [{"default": "openai:gpt-4o"}], "on_failure": ["anthropic:claude-haiku-4-5"]}
WEIGHTED = {
    "select": [
        {
            "router": "weighted",
            "candidates": ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"],
            "weights": {"openai:gpt-4o": 3, "anthropic:claude-sonnet-4-5": 1},
        },
        {"default": "openai:gpt-4o"},
    ],
    "on_failure": ["openai:gpt-4o-mini"],
}
NOON = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


@pytest.fixture
def configured(gateway_config_file: Path, tmp_path: Path):
    with routing_configured(gateway_config_file, tmp_path) as path:
        yield path


def candidate(position: int, target: str, reason: str) -> dict:
    provider, _, model = target.partition(":")
    return {
        "position": position,
        "target": target,
        "provider": provider,
        "model": model,
        "selection_reason": reason,
    }


# ---------------------------------------------------------------------------------------
# Aliases


def test_alias_create_list_repoint_and_delete(admin, time_machine):
    time_machine.move_to(NOON, tick=False)
    created = admin.post("/v1/aliases", json={"name": "fast", "target": "openai:gpt-4o-mini"})
    assert created.status_code == 200, created.text
    assert created.json() == {
        "name": "fast",
        "target": "openai:gpt-4o-mini",
        "source": "stored",
        "user_id": None,
        "created_at": "2025-03-14T12:00:00+00:00",
        "updated_at": "2025-03-14T12:00:00+00:00",
    }
    assert admin.get("/v1/aliases").json() == [created.json()]
    assert admin.get("/api/v1/aliases").json() == [created.json()]

    time_machine.move_to(NOON.replace(hour=13), tick=False)
    repointed = admin.post("/v1/aliases", json={"name": "fast", "target": "anthropic:claude-3"})
    assert repointed.status_code == 200
    assert repointed.json()["target"] == "anthropic:claude-3"
    assert repointed.json()["updated_at"] == "2025-03-14T13:00:00+00:00"
    assert list(Alias.objects.values_list("name", "target", "user_id")) == [
        ("fast", "anthropic:claude-3", "")
    ]

    deleted = admin.delete("/v1/aliases/fast")
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert not Alias.objects.exists()
    gone = admin.delete("/v1/aliases/fast")
    assert gone.status_code == 404
    assert gone.json() == {"detail": "alias 'fast' (global) not found"}


def test_a_user_scoped_alias_is_its_own_row(admin):
    make_user(user_id="alice")
    admin.post("/v1/aliases", json={"name": "fast", "target": "openai:gpt-4o-mini"})
    scoped = admin.post(
        "/v1/aliases", json={"name": "fast", "target": "anthropic:claude-3", "user_id": "alice"}
    )
    assert scoped.status_code == 200
    assert scoped.json()["user_id"] == "alice"
    listed = admin.get("/v1/aliases").json()
    assert [(a["name"], a["user_id"], a["target"]) for a in listed] == [
        ("fast", None, "openai:gpt-4o-mini"),
        ("fast", "alice", "anthropic:claude-3"),
    ]
    # Deleting one scope leaves the other.
    assert admin.delete("/v1/aliases/fast", params={"user_id": "alice"}).status_code == 204
    assert [a["user_id"] for a in admin.get("/v1/aliases").json()] == [None]
    missing = admin.delete("/v1/aliases/fast", params={"user_id": "alice"})
    assert missing.json() == {"detail": "alias 'fast' (scoped to user 'alice') not found"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"name": "fast", "target": "gpt-4o"},
            "alias 'fast': target 'gpt-4o' must be of the form 'provider:model'",
        ),
        (
            {"name": "fast", "target": "mistral:large"},
            "alias 'fast': target 'mistral:large' names provider 'mistral', which is not "
            "configured (configured: ",
        ),
        (
            {"name": "openai:fast", "target": "openai:gpt-4o"},
            "alias name 'openai:fast' must not contain ':' or '/'",
        ),
        (
            {"name": "openai", "target": "openai:gpt-4o"},
            "alias name 'openai' collides with a configured provider's name",
        ),
    ],
)
def test_an_alias_that_cannot_work_is_400_saying_why(admin, body, message):
    response = admin.post("/v1/aliases", json=body)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(message)
    assert not Alias.objects.exists()


@pytest.mark.parametrize(
    "body",
    [{}, {"name": "fast"}, {"name": 5, "target": "openai:x"}, {"name": "f", "target": None}],
)
def test_alias_bodies_of_the_wrong_type_are_422(admin, body):
    response = admin.post("/v1/aliases", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].split(":")[0] in {"name", "target"}


def test_an_alias_for_an_unknown_user_is_404(admin):
    response = admin.post(
        "/v1/aliases", json={"name": "fast", "target": "openai:gpt-4o", "user_id": "nobody"}
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "user 'nobody' not found"}


def test_configured_aliases_are_listed_and_read_only(admin, configured):
    listed = admin.get("/v1/aliases").json()
    assert listed == [
        {
            "name": "house",
            "target": "openai:gpt-4o-mini",
            "source": "config",
            "user_id": None,
            "created_at": None,
            "updated_at": None,
        }
    ]
    refused = admin.delete("/v1/aliases/house")
    assert refused.status_code == 404
    assert refused.json() == {
        "detail": "alias 'house' is in the configuration and cannot be deleted here"
    }
    # A global stored one of a configured name would never resolve: refused.
    shadow = admin.post("/v1/aliases", json={"name": "house", "target": "openai:gpt-4o"})
    assert shadow.status_code == 400
    assert "already an alias in the configuration" in shadow.json()["detail"]
    # Scoped to a user, it is a working override.
    make_user(user_id="alice")
    override = admin.post(
        "/v1/aliases", json={"name": "house", "target": "openai:gpt-4o", "user_id": "alice"}
    )
    assert override.status_code == 200
    assert [(a["source"], a["user_id"]) for a in admin.get("/v1/aliases").json()] == [
        ("config", None),
        ("stored", "alice"),
    ]
    # A policy's name is not an alias's.
    clash = admin.post("/v1/aliases", json={"name": "thrifty", "target": "openai:gpt-4o"})
    assert clash.status_code == 400
    assert "already a routing policy" in clash.json()["detail"]


def test_alias_lists_page(admin):
    for name in ("a", "b", "c"):
        admin.post("/v1/aliases", json={"name": name, "target": "openai:gpt-4o"})
    page = admin.get("/v1/aliases", params={"skip": 1, "limit": 1}).json()
    assert [a["name"] for a in page] == ["b"]
    assert admin.get("/v1/aliases", params={"limit": 0}).status_code == 422


# ---------------------------------------------------------------------------------------
# Policies


def test_policy_create_replace_list_and_delete(admin, time_machine):
    time_machine.move_to(NOON, tick=False)
    created = admin.post("/v1/routing/policies", json={"name": "fast", "spec": FAILOVER})
    assert created.status_code == 200, created.text
    assert created.json() == {
        "name": "fast",
        "spec": FAILOVER,
        "source": "stored",
        "user_id": None,
        "is_dynamic": False,
        "created_at": "2025-03-14T12:00:00+00:00",
        "updated_at": "2025-03-14T12:00:00+00:00",
    }
    assert admin.get("/v1/routing/policies").json() == [created.json()]
    assert admin.get("/api/v1/routing/policies").json() == [created.json()]

    time_machine.move_to(NOON.replace(hour=13), tick=False)
    replaced = admin.post("/v1/routing/policies", json={"name": "fast", "spec": TIERED})
    assert replaced.status_code == 200
    assert (replaced.json()["spec"], replaced.json()["is_dynamic"]) == (TIERED, True)
    assert replaced.json()["created_at"] == "2025-03-14T12:00:00+00:00"
    assert RoutingPolicy.objects.get().spec == TIERED

    assert admin.delete("/v1/routing/policies/fast").status_code == 204
    assert not RoutingPolicy.objects.exists()
    missing = admin.delete("/v1/routing/policies/fast")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "routing policy 'fast' (global) not found"}


def test_the_stored_spec_is_normalised(admin):
    sent = {
        "on_failure": ["anthropic:claude-haiku-4-5"],
        "select": [
            {"target": "openai:gpt-4o-mini", "when": {"budget_used_pct": {"gte": 80.0}}},
            {"default": "openai:gpt-4o"},
        ],
    }
    saved = admin.post("/v1/routing/policies", json={"name": "t", "spec": sent}).json()
    assert saved["spec"] == TIERED
    assert list(saved["spec"]) == ["select", "on_failure"]


def test_rename_from_moves_the_row_with_its_new_spec(admin, time_machine):
    time_machine.move_to(NOON, tick=False)
    first = admin.post("/v1/routing/policies", json={"name": "fast", "spec": FAILOVER}).json()
    pk = RoutingPolicy.objects.get().pk
    time_machine.move_to(NOON.replace(hour=13), tick=False)
    renamed = admin.post(
        "/v1/routing/policies",
        json={"name": "speedy", "spec": TIERED, "rename_from": "fast"},
    )
    assert renamed.status_code == 200
    assert renamed.json() == {
        **first,
        "name": "speedy",
        "spec": TIERED,
        "is_dynamic": True,
        "updated_at": "2025-03-14T13:00:00+00:00",
    }
    assert list(RoutingPolicy.objects.values_list("pk", "name")) == [(pk, "speedy")]

    # rename_from asserts the row exists: never a create.
    missing = admin.post(
        "/v1/routing/policies", json={"name": "x", "spec": FAILOVER, "rename_from": "fast"}
    )
    assert missing.status_code == 404
    assert missing.json() == {"detail": "routing policy 'fast' (global) not found"}
    # Onto a name the scope already has: 409, and neither row changes.
    admin.post("/v1/routing/policies", json={"name": "other", "spec": FAILOVER})
    taken = admin.post(
        "/v1/routing/policies",
        json={"name": "other", "spec": TIERED, "rename_from": "speedy"},
    )
    assert taken.status_code == 409
    assert taken.json()["detail"].startswith("routing policy 'other' already exists in this scope")
    assert dict(RoutingPolicy.objects.values_list("name", "spec")) == {
        "speedy": TIERED,
        "other": FAILOVER,
    }


def test_user_scoped_and_global_policies_are_separate(admin):
    make_user(user_id="alice")
    admin.post("/v1/routing/policies", json={"name": "fast", "spec": FAILOVER})
    scoped = admin.post(
        "/v1/routing/policies", json={"name": "fast", "spec": TIERED, "user_id": "alice"}
    )
    assert scoped.status_code == 200
    assert scoped.json()["user_id"] == "alice"
    listed = admin.get("/v1/routing/policies").json()
    assert [(p["name"], p["user_id"], p["spec"]) for p in listed] == [
        ("fast", None, FAILOVER),
        ("fast", "alice", TIERED),
    ]
    # explain resolves the name as the user would: theirs, else the global one.
    as_alice = admin.post(
        "/v1/routing/policies/explain",
        json={"name": "fast", "user_id": "alice", "budget_used_pct": 90},
    )
    assert as_alice.json()["selection_reason"] == "condition:budget_used_pct"
    as_bob = admin.post(
        "/v1/routing/policies/explain",
        json={"name": "fast", "user_id": "bob", "budget_used_pct": 90},
    )
    assert as_bob.json()["selection_reason"] == "default"

    assert admin.delete("/v1/routing/policies/fast", params={"user_id": "alice"}).status_code == 204
    assert [p["user_id"] for p in admin.get("/v1/routing/policies").json()] == [None]
    unknown_user = admin.post(
        "/v1/routing/policies", json={"name": "fast", "spec": TIERED, "user_id": "nobody"}
    )
    assert unknown_user.status_code == 404
    assert unknown_user.json() == {"detail": "user 'nobody' not found"}


def _with_entry(entry: dict) -> dict:
    return {"select": [entry, {"default": "openai:gpt-4o"}]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"select": [{"default": "mistral:large"}]},
            "select[0].default: target 'mistral:large' names provider 'mistral', which is "
            "not configured",
        ),
        (
            {"select": [{"default": "openai:gpt-4o"}, {"default": "openai:gpt-4o-mini"}]},
            "select[1] comes after the `default` entry, so it could never be reached",
        ),
        (
            _with_entry({"when": {"budget_used_pct": {"gte": 100}}, "target": "openai:x"}),
            "select[0].when.budget_used_pct >= 100 can never match",
        ),
        (
            _with_entry({"router": "weighted", "candidates": [], "weights": {"openai:x": 1}}),
            "select[0]: a router entry needs a non-empty `candidates` list",
        ),
        (
            _with_entry({"when": {"budget_usd_pct": {"gte": 50}}, "target": "openai:x"}),
            "select[0].when: unknown condition 'budget_usd_pct'",
        ),
        (
            _with_entry({"when": {"budget_used_pct": {"gte": 50, "lt": 70}}, "target": "openai:x"}),
            "select[0].when.budget_used_pct needs exactly one of gte, gt, lte, lt",
        ),
        ({"select": [{"default": "openai:gpt-4o"}], "fallback": []}, "unknown key 'fallback'"),
    ],
)
def test_a_spec_that_cannot_work_is_400_with_its_reason(admin, spec, message):
    response = admin.post("/v1/routing/policies", json={"name": "p", "spec": spec})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(message), response.json()
    assert not RoutingPolicy.objects.exists()
    # explain refuses the same draft with the same words.
    drafted = admin.post("/v1/routing/policies/explain", json={"spec": spec})
    assert (drafted.status_code, drafted.json()) == (400, response.json())


@pytest.mark.parametrize(
    "body",
    [
        {"name": "p"},
        {"name": "p", "spec": "select: []"},
        {"name": "p", "spec": [1]},
        {"spec": FAILOVER},
        {"name": "p", "spec": FAILOVER, "user_id": 5},
        {"name": "p", "spec": FAILOVER, "rename_from": 1},
    ],
)
def test_policy_bodies_of_the_wrong_type_are_422(admin, body):
    response = admin.post("/v1/routing/policies", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].split(":")[0] in {"name", "spec", "user_id", "rename_from"}


def test_configured_policies_are_listed_and_read_only(admin, configured):
    listed = {p["name"]: p for p in admin.get("/v1/routing/policies").json()}
    assert list(listed) == ["balanced", "thrifty"]
    assert listed["thrifty"] == {
        "name": "thrifty",
        "spec": TIERED,
        "source": "config",
        "user_id": None,
        "is_dynamic": True,
        "created_at": None,
        "updated_at": None,
    }
    refused = admin.delete("/v1/routing/policies/thrifty")
    assert refused.status_code == 404
    assert refused.json() == {
        "detail": "routing policy 'thrifty' is in the configuration and cannot be deleted here"
    }
    rename = admin.post(
        "/v1/routing/policies",
        json={"name": "frugal", "spec": TIERED, "rename_from": "thrifty"},
    )
    assert rename.status_code == 404
    assert "is in the configuration and cannot be renamed here" in rename.json()["detail"]
    shadow = admin.post("/v1/routing/policies", json={"name": "thrifty", "spec": FAILOVER})
    assert shadow.status_code == 400
    assert "already a routing policy in the configuration" in shadow.json()["detail"]
    alias_name = admin.post("/v1/routing/policies", json={"name": "house", "spec": FAILOVER})
    assert alias_name.status_code == 400
    assert "'house' is already an alias" in alias_name.json()["detail"]
    # Stored ones list next to them, by name.
    admin.post("/v1/routing/policies", json={"name": "cheap", "spec": FAILOVER})
    assert [(p["name"], p["source"]) for p in admin.get("/v1/routing/policies").json()] == [
        ("balanced", "config"),
        ("cheap", "stored"),
        ("thrifty", "config"),
    ]


def test_a_policy_named_explain_is_still_deleted(admin):
    admin.post("/v1/routing/policies", json={"name": "explain", "spec": FAILOVER})
    assert admin.delete("/v1/routing/policies/explain").status_code == 204
    assert not RoutingPolicy.objects.exists()


# ---------------------------------------------------------------------------------------
# Explain


def test_explain_a_budget_tier_at_its_threshold(admin, configured):
    def explained(**body):
        response = admin.post("/v1/routing/policies/explain", json={"name": "thrifty", **body})
        assert response.status_code == 200, response.text
        return response.json()

    below = explained(budget_used_pct=79.99)
    assert below == {
        "name": "thrifty",
        "selection_reason": "default",
        "is_dynamic": True,
        "candidates": [
            candidate(1, "openai:gpt-4o", "default"),
            candidate(2, "anthropic:claude-haiku-4-5", "on_failure"),
        ],
        "dropped": [],
        "router_weights": None,
    }
    at = explained(budget_used_pct=80)
    assert at["selection_reason"] == "condition:budget_used_pct"
    assert at["candidates"] == [
        candidate(1, "openai:gpt-4o-mini", "condition:budget_used_pct"),
        candidate(2, "anthropic:claude-haiku-4-5", "on_failure"),
    ]
    # No budget number (a caller without a cap): the condition never matches.
    assert explained()["selection_reason"] == "default"
    # budget_remaining_usd, on an unsaved draft.
    draft = {
        "select": [
            {"when": {"budget_remaining_usd": {"lt": 5}}, "target": "openai:gpt-4o-mini"},
            {"default": "openai:gpt-4o"},
        ]
    }
    low = admin.post(
        "/v1/routing/policies/explain",
        json={"spec": draft, "name": "draft-tier", "budget_remaining_usd": 4.999999},
    ).json()
    assert (low["name"], low["selection_reason"]) == (
        "draft-tier",
        "condition:budget_remaining_usd",
    )


def test_explain_a_weighted_policy_shows_its_split(admin):
    admin.post("/v1/routing/policies", json={"name": "split", "spec": WEIGHTED})
    response = admin.post("/v1/routing/policies/explain", json={"name": "split"})
    assert response.status_code == 200
    assert response.json() == {
        "name": "split",
        "selection_reason": "router:weighted",
        "is_dynamic": True,
        "candidates": [
            candidate(1, "openai:gpt-4o", "router:weighted"),
            candidate(2, "anthropic:claude-sonnet-4-5", "router:weighted"),
            candidate(3, "openai:gpt-4o-mini", "on_failure"),
        ],
        "dropped": [],
        "router_weights": {"openai:gpt-4o": 75.0, "anthropic:claude-sonnet-4-5": 25.0},
    }
    # A caller's allow-list narrows the split, and names what it dropped.
    narrowed = admin.post(
        "/v1/routing/policies/explain",
        json={"name": "split", "allowed_models": ["anthropic:*"]},
    ).json()
    assert narrowed["router_weights"] == {"anthropic:claude-sonnet-4-5": 100.0}
    assert narrowed["dropped"] == [
        {
            "target": "openai:gpt-4o",
            "reason": "not_allowed",
            "detail": "is not in allowed_models for this caller",
        },
        {
            "target": "openai:gpt-4o-mini",
            "reason": "not_allowed",
            "detail": "is not in allowed_models for this caller",
        },
    ]


def test_explain_shows_a_target_cooling_down(admin, settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 1
    admin.post("/v1/routing/policies", json={"name": "fast", "spec": FAILOVER})
    run_async(health.record("openai:gpt-4o", ok=False))
    result = admin.post("/v1/routing/policies/explain", json={"name": "fast"}).json()
    assert result["candidates"] == [candidate(1, "anthropic:claude-haiku-4-5", "on_failure")]
    ((dropped),) = result["dropped"]
    assert (dropped["target"], dropped["reason"]) == ("openai:gpt-4o", "cooling_down")
    assert dropped["detail"].startswith("is cooling down after repeated failures, until ")


def test_explain_by_key_id_and_for_an_alias(admin, configured):
    draft = {
        "select": [
            {"when": {"key_id": ["k1", "k2"]}, "target": "openai:gpt-4o-mini"},
            {"default": "openai:gpt-4o"},
        ]
    }
    hit = admin.post("/v1/routing/policies/explain", json={"spec": draft, "key_id": "k2"})
    assert hit.json()["selection_reason"] == "condition:key_id"
    alias = admin.post("/v1/routing/policies/explain", json={"name": "house"}).json()
    assert alias["candidates"] == [candidate(1, "openai:gpt-4o-mini", "default")]


def test_explain_refusals(admin):
    neither = admin.post("/v1/routing/policies/explain", json={})
    assert neither.status_code == 400
    assert neither.json()["detail"].startswith("pass `spec` (a draft to check), `name`")
    unknown = admin.post("/v1/routing/policies/explain", json={"name": "nope"})
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"detail": "routing policy 'nope' not found"},
    )
    for body in (
        {"name": "p", "budget_used_pct": "85"},
        {"name": "p", "budget_remaining_usd": True},
        {"name": "p", "allowed_models": "openai:*"},
        {"name": "p", "spec": "select"},
    ):
        response = admin.post("/v1/routing/policies/explain", json=body)
        assert response.status_code == 422, body


def test_the_management_api_needs_the_master_key(gateway):
    with gateway.client() as anonymous:
        for method, path in (
            ("GET", "/v1/aliases"),
            ("POST", "/v1/aliases"),
            ("DELETE", "/v1/aliases/x"),
            ("GET", "/v1/routing/policies"),
            ("POST", "/v1/routing/policies"),
            ("DELETE", "/v1/routing/policies/x"),
            ("POST", "/v1/routing/policies/explain"),
        ):
            assert anonymous.request(method, path).status_code == 401, path


def test_the_schema_describes_the_routing_routes(gateway):
    with gateway.client() as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/aliases"]) == {"get", "post"}
    assert set(paths["/v1/aliases/{name}"]) == {"delete"}
    assert set(paths["/v1/routing/policies"]) == {"get", "post"}
    assert set(paths["/v1/routing/policies/{name}"]) == {"delete"}
    assert set(paths["/v1/routing/policies/explain"]) == {"post"}
    assert "204" in paths["/v1/routing/policies/{name}"]["delete"]["responses"]
    explain = schema["components"]["schemas"]["ExplainResponse"]
    assert set(explain["required"]) >= {"name", "selection_reason", "candidates", "dropped"}
