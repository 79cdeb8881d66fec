"""Stored aliases and policies (issue 15): the write rules, and which one a name
resolves to (otari's precedence: user-scoped stored > configured > global stored)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from common.config import gateway_config
from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing import policy_lookup, policy_lookup_async
from llm_proxy.routing.registry import check_config
from llm_proxy.routing.spec import SpecError
from llm_proxy.routing.store import (
    Conflict,
    NotFound,
    alias_create,
    alias_delete,
    policy_delete,
    policy_save,
)
from tests.conftest import REPO, run_async
from tests.factories import make_user

pytestmark = pytest.mark.django_db(transaction=True)

ROUTING = """
aliases:
  cfg-alias: openai:from-config-alias
routing:
  policies:
    cfg-policy:
      select: [{default: openai:from-config}]
"""


@pytest.fixture
def configured(gateway_config_file: Path, tmp_path: Path, settings) -> Iterator[Path]:
    """The session's providers plus configured routing."""
    path = tmp_path / "otari.yaml"
    path.write_text(gateway_config_file.read_text() + ROUTING)
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    yield path
    gateway_config.cache_clear()


def one(target: str) -> dict:
    return {"select": [{"default": target}]}


def head(name: str, user_id: str | None) -> str | None:
    policy = policy_lookup(name, user_id=user_id)
    via_async = run_async(policy_lookup_async(name, user_id=user_id))
    assert policy == via_async
    return policy.default_target if policy else None


def test_precedence_user_scoped_then_configured_then_global(configured):
    make_user(user_id="ann")
    make_user(user_id="bob")
    policy_save(name="cfg-policy", spec=one("openai:ann-own"), user_id="ann")
    policy_save(name="shared", spec=one("openai:global"))
    policy_save(name="shared", spec=one("openai:bob-own"), user_id="bob")

    assert head("cfg-policy", "ann") == "openai:ann-own"
    assert head("cfg-policy", "bob") == "openai:from-config"
    assert head("cfg-policy", None) == "openai:from-config"
    assert head("shared", "bob") == "openai:bob-own"
    assert head("shared", "ann") == "openai:global"
    assert head("shared", None) == "openai:global"
    assert head("cfg-alias", None) == "openai:from-config-alias"
    assert head("nothing", "ann") is None
    # A selector never reaches routing.
    assert policy_lookup("openai:gpt-4o", user_id="ann") is None
    assert run_async(policy_lookup_async("team/model", user_id=None)) is None


def test_an_alias_resolves_as_a_one_target_policy_and_is_deleted_by_scope(configured):
    make_user(user_id="ann")
    alias_create(name="fast", target="openai:gpt-4o-mini")
    alias_create(name="fast", target="anthropic:haiku", user_id="ann")
    assert head("fast", None) == "openai:gpt-4o-mini"
    assert head("fast", "ann") == "anthropic:haiku"
    alias_create(name="fast", target="openai:gpt-4o")  # re-pointed, not duplicated
    assert Alias.objects.filter(name="fast", user_id="").get().target == "openai:gpt-4o"
    alias_delete(name="fast", user_id="ann")
    assert head("fast", "ann") == "openai:gpt-4o"
    with pytest.raises(NotFound, match=r"alias 'fast' \(scoped to user 'ann'\) not found"):
        alias_delete(name="fast", user_id="ann")
    with pytest.raises(NotFound, match="in the configuration"):
        alias_delete(name="cfg-alias")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: policy_save(name="cfg-policy", spec=one("openai:x")), "in the configuration"),
        (lambda: alias_create(name="cfg-alias", target="openai:x"), "in the configuration"),
        (lambda: alias_create(name="cfg-policy", target="openai:x"), "already a routing policy"),
        (lambda: policy_save(name="cfg-alias", spec=one("openai:x")), "already an alias"),
        (lambda: policy_save(name="a:b", spec=one("openai:x")), "must not contain"),
        (lambda: alias_create(name="x", target="nowhere:m"), "not configured"),
        (lambda: policy_save(name="p", spec={"select": []}), "non-empty list"),
    ],
)
def test_writes_that_could_not_work_are_refused(configured, call, message):
    with pytest.raises(SpecError) as refused:
        call()
    assert message in refused.value.message
    assert not RoutingPolicy.objects.exists()
    assert not Alias.objects.exists()


def test_names_collide_across_kinds_in_every_scope(configured):
    make_user(user_id="ann")
    alias_create(name="fast", target="openai:x", user_id="ann")
    with pytest.raises(SpecError, match="already an alias"):
        policy_save(name="fast", spec=one("openai:y"))
    policy_save(name="smart", spec=one("openai:y"), user_id="ann")
    with pytest.raises(SpecError, match="already a routing policy"):
        alias_create(name="smart", target="openai:x")


def test_an_unknown_user_is_not_found(configured):
    with pytest.raises(NotFound, match="user 'ghost' not found"):
        policy_save(name="p", spec=one("openai:x"), user_id="ghost")


def test_rename_moves_the_row_with_its_new_spec_in_one_write(configured):
    first = policy_save(name="fast", spec=one("openai:x"))
    renamed = policy_save(name="speedy", spec=one("openai:y"), rename_from="fast")
    assert renamed.pk == first.pk
    assert list(RoutingPolicy.objects.values_list("name", "spec")) == [
        ("speedy", {"select": [{"default": "openai:y"}], "on_failure": []})
    ]
    assert head("fast", None) is None
    policy_save(name="other", spec=one("openai:z"))
    with pytest.raises(Conflict, match="'other' already exists"):
        policy_save(name="other", spec=one("openai:z"), rename_from="speedy")
    with pytest.raises(NotFound, match=r"'gone' \(global\) not found"):
        policy_save(name="x", spec=one("openai:z"), rename_from="gone")
    policy_delete(name="other")
    with pytest.raises(NotFound):
        policy_delete(name="other")
    assert list(RoutingPolicy.objects.values_list("name", flat=True)) == ["speedy"]


def test_a_bad_configured_spec_refuses_startup_naming_it(gateway_config_file, tmp_path, settings):
    path = tmp_path / "bad.yaml"
    path.write_text(
        gateway_config_file.read_text()
        + "routing:\n  policies:\n    thrifty:\n      select:\n"
        + "        - {when: {budget_used_pct: {gte: 100}}, target: openai:nano}\n"
        + "        - {default: openai:mini}\n"
    )
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    try:
        with pytest.raises(ImproperlyConfigured, match=r"routing.policies.thrifty: .*>= 100"):
            check_config()
    finally:
        gateway_config.cache_clear()
    # A process with that configuration does not start.
    started = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env={**os.environ, "OTARI_CONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "routing.policies.thrifty: select[0].when.budget_used_pct >= 100" in started.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("aliases: {fast: nowhere:m}\n", "aliases.fast: alias 'fast': target 'nowhere:m'"),
        (
            "aliases: {fast: openai:m}\n"
            "routing: {policies: {fast: {select: [{default: openai:m}]}}}\n",
            "routing.policies.fast: collides with the alias",
        ),
        ("routing: {policies: {p: {select: [{defualt: openai:m}]}}}\n", "unknown key 'defualt'"),
        ("routing: {polices: {}}\n", "routing: expected a mapping with `policies`"),
    ],
)
def test_other_configuration_refusals(gateway_config_file, tmp_path, settings, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text(gateway_config_file.read_text() + extra)
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    try:
        with pytest.raises(ImproperlyConfigured) as refused:
            check_config()
        assert message in str(refused.value)
    finally:
        gateway_config.cache_clear()
