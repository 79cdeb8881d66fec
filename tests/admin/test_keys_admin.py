"""API keys in the console: the secret is shown once, in the response that made it, and
kept nowhere; the hash is never shown; revoke and rotate go through the services."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.sessions.models import Session
from django.db import connection
from django.utils import timezone

from budgets.models import APIKey
from budgets.services.keys import API_KEY_PREFIX, secret_hash
from tests.admin.conftest import admin_url
from tests.factories import make_key, make_user

pytestmark = pytest.mark.django_db


def _secrets_in(html: str) -> list[str]:
    """Every full `gw-` secret (48 url-safe bytes = 64 characters) in a page."""
    import re

    return re.findall(r"gw-[A-Za-z0-9_\-]{64}", html)


def _everything_stored() -> str:
    """The text of every row of every table (the database as an attacker would dump it)."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            chunks.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(chunks)


def test_creating_a_key_shows_its_secret_once_and_stores_only_its_hash(admin_client):
    user = make_user(user_id="alice")
    response = admin_client.post(
        admin_url(APIKey, "add"),
        {"user": "alice", "key_name": "ci", "allowed_models": "null", "metadata": "{}"},
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    html = response.content.decode()
    assert "This is the only time this secret is shown." in html
    [secret] = set(_secrets_in(html))
    key = APIKey.objects.get()
    assert (key.user_id, key.key_name, key.is_active) == (user.pk, "ci", True)
    assert key.key_hash == secret_hash(secret)
    assert secret.startswith(API_KEY_PREFIX)
    assert key.key_prefix == secret[:10]
    assert key.key_hash not in html

    # Nowhere else: not in the database (sessions, messages and the admin log included)...
    assert secret not in _everything_stored()
    for session in Session.objects.all():
        assert secret not in repr(session.get_decoded())
    assert LogEntry.objects.get().action_flag == ADDITION
    # ...and never again on any page.
    for url in (
        admin_url(APIKey, "changelist"),
        admin_url(key, "change"),
        admin_url(user, "change"),
        admin_url(APIKey, "add"),
    ):
        page = admin_client.get(url).content.decode()
        assert secret not in page
        assert key.key_hash not in page
        assert _secrets_in(page) == []


def test_the_new_secret_authenticates_at_the_gateway(gateway, django_user_model):
    """Created in the console, used on /v1/chat/completions: the whole path is real."""
    from django.test import Client

    from tests.factories import make_budget, set_price

    set_price()
    make_user(user_id="bob", budget=make_budget(max_budget_usd=None))
    admin = django_user_model.objects.create_superuser("root", "", "pw-root-123")
    client = Client()
    client.force_login(admin)
    html = client.post(
        admin_url(APIKey, "add"),
        {"user": "bob", "key_name": "", "allowed_models": "null", "metadata": "{}"},
    ).content.decode()
    [secret] = set(_secrets_in(html))

    assert gateway.chat(secret, model="openai:gpt-4o-mini").status_code == 200
    assert gateway.chat(secret + "x", model="openai:gpt-4o-mini").status_code == 401


def test_add_form_is_prefilled_with_the_user_and_refuses_a_past_expiry(admin_client):
    make_user(user_id="carol")
    page = admin_client.get(admin_url(APIKey, "add"), {"user": "carol"})
    assert page.context["adminform"].form.initial["user"] == "carol"

    response = admin_client.post(
        admin_url(APIKey, "add"),
        {
            "user": "carol",
            "expires_at_0": "2001-01-01",
            "expires_at_1": "00:00",
            "allowed_models": "null",
            "metadata": "{}",
        },
    )
    assert (
        "The expiry must be in the future."
        in response.context["adminform"].form.errors["expires_at"]
    )
    assert not APIKey.objects.exists()


def test_change_page_edits_settings_never_the_secret(admin_client):
    key, secret = make_key(make_user(), key_name="old")
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    response = admin_client.post(
        admin_url(key, "change"),
        {
            "key_name": "renamed",
            "is_active": "on",
            "expires_at_0": expires.strftime("%Y-%m-%d"),
            "expires_at_1": expires.strftime("%H:%M:%S"),
            "allowed_models": '["openai:gpt-4o-mini"]',
            "exclude_from_budget": "on",
            "metadata": "{}",
            # Crafted: the hash and prefix are not form fields and must be ignored.
            "key_hash": "0" * 64,
            "key_prefix": "gw-forged",
        },
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.key_name, key.expires_at, key.exclude_from_budget) == ("renamed", expires, True)
    assert key.allowed_models == ["openai:gpt-4o-mini"]
    assert key.key_hash == secret_hash(secret)
    page = admin_client.get(admin_url(key, "change")).content.decode()
    assert key.key_hash not in page
    assert secret not in page


def test_revoke_action(admin_client):
    user = make_user()
    (k1, _), (k2, _) = make_key(user), make_key(user)
    admin_client.post(
        admin_url(APIKey, "changelist"),
        {"action": "revoke_keys", "_selected_action": [str(k1.pk)]},
    )
    assert not APIKey.objects.get(pk=k1.pk).is_active
    assert APIKey.objects.get(pk=k2.pk).is_active
    entry = LogEntry.objects.get()
    assert (entry.action_flag, entry.object_id, entry.change_message) == (
        CHANGE,
        str(k1.pk),
        "Revoked the key.",
    )


def test_rotate_action_shows_each_new_secret_once(admin_client):
    user = make_user()
    (k1, old1), (k2, old2) = make_key(user, key_name="one"), make_key(user, key_name="two")

    response = admin_client.post(
        admin_url(APIKey, "changelist"),
        {"action": "rotate_keys", "_selected_action": [str(k1.pk), str(k2.pk)]},
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    html = response.content.decode()
    new = set(_secrets_in(html))
    assert len(new) == 2
    assert not {old1, old2} & new
    hashes = set(APIKey.objects.values_list("key_hash", flat=True))
    assert hashes == {secret_hash(s) for s in new}
    assert LogEntry.objects.filter(change_message="Rotated the key's secret.").count() == 2
    for s in new:
        assert s not in _everything_stored()


def test_keys_cannot_be_deleted_only_revoked(admin_client):
    key, _ = make_key(make_user())
    assert admin_client.get(admin_url(key, "delete")).status_code == 403
    assert admin_client.post(admin_url(key, "delete"), {"post": "yes"}).status_code == 403
    assert APIKey.objects.filter(pk=key.pk).exists()


def test_changelist_shows_prefix_state_and_expiry_not_the_hash(admin_client):
    user = make_user(user_id="dave", alias="Dave")
    active, _ = make_key(user, key_name="active")
    expired, _ = make_key(user, key_name="old", expires_at=timezone.now() - timedelta(days=1))
    revoked, _ = make_key(user, key_name="gone")
    APIKey.objects.filter(pk=revoked.pk).update(is_active=False)

    html = admin_client.get(admin_url(APIKey, "changelist")).content.decode()

    for key in (active, expired, revoked):
        assert f"{key.key_prefix}…{key.key_suffix}" in html
        assert key.key_hash not in html
    for state in (">active<", ">expired<", ">revoked<", "never"):
        assert state in html
    found = admin_client.get(admin_url(APIKey, "changelist"), {"expiry": "expired"})
    assert [k.pk for k in found.context["cl"].result_list] == [expired.pk]
