"""The console's aliases and routing policies (issue 15): the lists with the configured
ones and their source, add/edit/delete of stored ones through the forms landing as the
store services write them (a spec that cannot work refused on the form with its reason),
configured ones read-only, and a page per policy with its plan and its targets' health."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.messages import get_messages

from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing import health, store
from tests.admin.conftest import admin_url
from tests.conftest import run_async
from tests.factories import make_user
from tests.routing_config import routing_configured

pytestmark = pytest.mark.django_db

FAILOVER = {"select": [{"default": "openai:gpt-4o"}], "on_failure": ["anthropic:claude-haiku-4-5"]}
FAILOVER_YAML = """select:
- default: openai:gpt-4o
on_failure:
- anthropic:claude-haiku-4-5
"""


@pytest.fixture(autouse=True)
def configured(gateway_config_file: Path, tmp_path: Path, settings):
    settings.OTARI_ROUTING_REDIS_URL = ""
    health.reset()
    with routing_configured(gateway_config_file, tmp_path) as path:
        yield path
    health.reset()


def plan_url(name: str, source: str, user_id: str = "") -> str:
    url = f"/admin/llm_proxy/routingpolicy/plan/{source}/{name}/"
    return f"{url}?user_id={user_id}" if user_id else url


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# ---------------------------------------------------------------------------------------
# Lists


def test_policy_list_shows_configured_and_stored_with_their_source(admin_client):
    make_user(user_id="alice")
    store.policy_save(name="fast", spec=FAILOVER)
    store.policy_save(name="fast", spec=FAILOVER, user_id="alice")
    response = admin_client.get(admin_url(RoutingPolicy, "changelist"))
    assert response.status_code == 200
    html = response.content.decode()
    configured = [row["entry"].name for row in response.context["configured"]]
    assert configured == ["balanced", "thrifty"]
    assert [(p.name, p.user_id) for p in response.context["cl"].result_list] == [
        ("fast", ""),
        ("fast", "alice"),
    ]
    for text in (
        "Configured in OTARI_CONFIG (read-only)",
        "openai:gpt-4o, anthropic:claude-sonnet-4-5, openai:gpt-4o-mini",
        "default openai:gpt-4o; then anthropic:claude-haiku-4-5",
        "user alice",
        plan_url("balanced", "config"),
        plan_url("fast", "stored", "alice"),
    ):
        assert text in html, text
    assert ">config<" in html
    assert ">stored<" in html


def test_alias_list_shows_configured_and_stored(admin_client):
    store.alias_create(name="fast", target="openai:gpt-4o")
    response = admin_client.get(admin_url(Alias, "changelist"))
    assert response.status_code == 200
    assert [row["entry"].name for row in response.context["configured"]] == ["house"]
    assert [a.name for a in response.context["cl"].result_list] == ["fast"]
    html = response.content.decode()
    assert "openai:gpt-4o-mini" in html
    assert plan_url("house", "config") in html


def test_the_sections_are_in_the_console_navigation(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert 'href="/admin/llm_proxy/routingpolicy/"' in html
    assert 'href="/admin/llm_proxy/alias/"' in html


# ---------------------------------------------------------------------------------------
# Forms


def test_add_a_policy_through_the_form(admin_client):
    response = admin_client.post(
        admin_url(RoutingPolicy, "add"),
        {"name": "fast", "user_id": "", "spec_text": FAILOVER_YAML},
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    policy = RoutingPolicy.objects.get()
    assert (policy.name, policy.user_id, policy.spec) == ("fast", "", FAILOVER)
    # JSON is YAML too.
    admin_client.post(
        admin_url(RoutingPolicy, "add"),
        {"name": "json", "user_id": "", "spec_text": '{"select": [{"default": "openai:x"}]}'},
    )
    assert RoutingPolicy.objects.get(name="json").spec == {
        "select": [{"default": "openai:x"}],
        "on_failure": [],
    }


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        (
            "select:\n- default: mistral:large\n",
            "select[0].default: target &#x27;mistral:large&#x27; names provider "
            "&#x27;mistral&#x27;, which is not configured",
        ),
        (
            "select:\n- when: {budget_used_pct: {gte: 100}}\n  target: openai:x\n"
            "- default: openai:y\n",
            "select[0].when.budget_used_pct &gt;= 100 can never match",
        ),
        (
            "select: [default: openai:x\n",
            "Not valid YAML or JSON (line 1, column 27): expected &#x27;,&#x27; or &#x27;]&#x27;",
        ),
        ("- openai:x\n", "a routing policy spec must be a mapping with `select`"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_on_the_form(admin_client, spec_text, message):
    response = admin_client.post(
        admin_url(RoutingPolicy, "add"), {"name": "p", "user_id": "", "spec_text": spec_text}
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert message in html
    assert "errorlist" in html
    assert not RoutingPolicy.objects.exists()


def test_form_refusals_the_service_makes(admin_client):
    shadow = admin_client.post(
        admin_url(RoutingPolicy, "add"),
        {"name": "thrifty", "user_id": "", "spec_text": FAILOVER_YAML},
    )
    assert "already a routing policy in the configuration" in shadow.content.decode()
    unknown_user = admin_client.post(
        admin_url(RoutingPolicy, "add"),
        {"name": "mine", "user_id": "nobody", "spec_text": FAILOVER_YAML},
    )
    assert "user &#x27;nobody&#x27; not found" in unknown_user.content.decode()
    assert not RoutingPolicy.objects.exists()
    # Adding a name the scope already has is refused, not a silent replace.
    store.policy_save(name="fast", spec=FAILOVER)
    taken = admin_client.post(
        admin_url(RoutingPolicy, "add"),
        {"name": "fast", "user_id": "", "spec_text": "select: [{default: openai:x}]"},
    )
    assert taken.status_code == 200
    assert RoutingPolicy.objects.get().spec == FAILOVER


def test_edit_renames_and_replaces_the_spec_in_one_write(admin_client):
    row = store.policy_save(name="fast", spec=FAILOVER)
    page = admin_client.get(admin_url(row, "change"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "default: openai:gpt-4o" in html
    assert plan_url("fast", "stored") in html

    response = admin_client.post(
        admin_url(row, "change"),
        {"name": "speedy", "spec_text": "select:\n- default: anthropic:claude-haiku-4-5\n"},
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert list(RoutingPolicy.objects.values_list("pk", "name", "spec")) == [
        (
            row.pk,
            "speedy",
            {"select": [{"default": "anthropic:claude-haiku-4-5"}], "on_failure": []},
        )
    ]
    # Onto a name the scope has: the service's 409, on the form.
    store.policy_save(name="other", spec=FAILOVER)
    clash = admin_client.post(
        admin_url(row, "change"), {"name": "other", "spec_text": FAILOVER_YAML}
    )
    assert clash.status_code == 200
    assert "routing policy &#x27;other&#x27; already exists in this scope" in (
        clash.content.decode()
    )
    assert RoutingPolicy.objects.get(pk=row.pk).name == "speedy"


def test_delete_a_policy_through_the_console(admin_client):
    row = store.policy_save(name="fast", spec=FAILOVER)
    response = admin_client.post(admin_url(row, "delete"), {"post": "yes"})
    assert response.status_code == 302
    assert not RoutingPolicy.objects.exists()


def test_add_edit_and_delete_an_alias(admin_client):
    make_user(user_id="alice")
    added = admin_client.post(
        admin_url(Alias, "add"),
        {"name": "house", "target": "anthropic:claude-haiku-4-5", "user_id": "alice"},
    )
    assert added.status_code == 302, added.context["adminform"].form.errors
    alias = Alias.objects.get()
    assert (alias.name, alias.target, alias.user_id) == (
        "house",
        "anthropic:claude-haiku-4-5",
        "alice",
    )
    edited = admin_client.post(admin_url(alias, "change"), {"target": "openai:gpt-4o"})
    assert edited.status_code == 302
    assert list(Alias.objects.values_list("name", "target", "user_id")) == [
        ("house", "openai:gpt-4o", "alice")
    ]
    wrong = admin_client.post(admin_url(alias, "change"), {"target": "gpt-4o"})
    assert wrong.status_code == 200
    assert "must be of the form &#x27;provider:model&#x27;" in wrong.content.decode()
    # A global alias of a configured name would never resolve: refused with why.
    shadow = admin_client.post(
        admin_url(Alias, "add"), {"name": "house", "target": "openai:gpt-4o", "user_id": ""}
    )
    assert "already an alias in the configuration" in shadow.content.decode()

    deleted = admin_client.post(admin_url(alias, "delete"), {"post": "yes"})
    assert deleted.status_code == 302
    assert not Alias.objects.exists()


# ---------------------------------------------------------------------------------------
# The plan page


def test_a_weighted_policy_page_shows_its_plan_shares_and_health(admin_client, settings):
    settings.OTARI_ROUTING_FAILURE_THRESHOLD = 1
    run_async(health.record("openai:gpt-4o", ok=False))
    response = admin_client.get(plan_url("balanced", "config"))
    assert response.status_code == 200
    context = response.context
    assert [row["kind"] for row in context["select_rows"]] == ["router: weighted", "default"]
    assert [(t["target"], t["share"]) for t in context["select_rows"][0]["targets"]] == [
        ("openai:gpt-4o", 75.0),
        ("anthropic:claude-sonnet-4-5", 25.0),
    ]
    assert context["on_failure"] == ["openai:gpt-4o-mini"]
    live = context["live"]
    assert [c["target"] for c in live["candidates"]] == [
        "anthropic:claude-sonnet-4-5",
        "openai:gpt-4o-mini",
    ]
    assert [(d["target"], d["reason"]) for d in live["dropped"]] == [
        ("openai:gpt-4o", "cooling_down")
    ]
    cooling = {h["target"]: h["until"] for h in context["targets_health"]}
    assert cooling["openai:gpt-4o"] is not None
    assert cooling["openai:gpt-4o-mini"] is None
    html = response.content.decode()
    for text in (
        "75%",
        "25%",
        "cooling down",
        "in service",
        "dropped: is cooling down after repeated failures",
        "selected by <code>router:weighted</code>",
        "(OTARI_CONFIG, read-only)",
    ):
        assert text in html, text


def test_a_tiered_policy_page_shows_its_conditions_and_declared_plan(admin_client):
    response = admin_client.get(plan_url("thrifty", "config"))
    assert response.status_code == 200
    rows = response.context["select_rows"]
    assert rows[0]["conditions"] == "budget_used_pct >= 80"
    live = response.context["live"]
    assert live["selection_reason"] == "default"
    assert [c["target"] for c in live["candidates"]] == [
        "openai:gpt-4o",
        "anthropic:claude-haiku-4-5",
    ]


def test_stored_policy_and_alias_pages(admin_client):
    make_user(user_id="alice")
    row = store.policy_save(name="fast", spec=FAILOVER, user_id="alice")
    page = admin_client.get(plan_url("fast", "stored", "alice"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "user alice" in html
    assert admin_url(row, "change") in html
    assert admin_client.get(plan_url("fast", "stored")).status_code == 404
    store.alias_create(name="quick", target="openai:gpt-4o")
    alias_page = admin_client.get(plan_url("quick", "stored"))
    assert alias_page.status_code == 200
    assert [c["target"] for c in alias_page.context["live"]["candidates"]] == ["openai:gpt-4o"]
    assert admin_client.get(plan_url("house", "config")).status_code == 200


def test_pages_need_the_view_permission(staff_client):
    nobody = staff_client()
    assert nobody.get(plan_url("balanced", "config")).status_code == 403
    assert nobody.get(admin_url(RoutingPolicy, "changelist")).status_code == 403
    viewer = staff_client("llm_proxy.view_routingpolicy")
    assert viewer.get(plan_url("balanced", "config")).status_code == 200
    assert viewer.get(admin_url(RoutingPolicy, "changelist")).status_code == 200
    assert viewer.get(plan_url("house", "config")).status_code == 403
