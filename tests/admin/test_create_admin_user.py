"""manage.py create_admin_user: the first console login, from environment variables."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db


def _run(monkeypatch, *args: str, **env: str) -> str:
    for name in ("OTARI_ADMIN_USERNAME", "OTARI_ADMIN_PASSWORD", "OTARI_ADMIN_EMAIL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = StringIO()
    call_command("create_admin_user", *args, stdout=out)
    return out.getvalue()


def test_creates_a_superuser_that_can_log_in(monkeypatch, client):
    out = _run(
        monkeypatch,
        OTARI_ADMIN_USERNAME="ops",
        OTARI_ADMIN_PASSWORD="correct-horse-battery",
        OTARI_ADMIN_EMAIL="ops@example.com",
    )
    assert out == "create_admin_user: ops created\n"
    user = get_user_model().objects.get(username="ops")
    assert (user.is_staff, user.is_superuser, user.email) == (True, True, "ops@example.com")
    assert client.login(username="ops", password="correct-horse-battery")
    assert client.get("/admin/").status_code == 200


def test_is_idempotent_and_keeps_a_changed_password(monkeypatch):
    env = {"OTARI_ADMIN_USERNAME": "ops", "OTARI_ADMIN_PASSWORD": "correct-horse-battery"}
    _run(monkeypatch, **env)
    user = get_user_model().objects.get(username="ops")
    user.set_password("changed-in-the-console")
    user.is_superuser = False
    user.save()

    out = _run(monkeypatch, **env)

    assert out == "create_admin_user: ops already existed; password kept\n"
    user.refresh_from_db()
    assert user.check_password("changed-in-the-console")
    assert user.is_superuser  # always leaves a way in
    assert get_user_model().objects.count() == 1


def test_reset_password(monkeypatch):
    _run(monkeypatch, OTARI_ADMIN_USERNAME="ops", OTARI_ADMIN_PASSWORD="correct-horse-battery")
    out = _run(
        monkeypatch,
        "--reset-password",
        OTARI_ADMIN_USERNAME="ops",
        OTARI_ADMIN_PASSWORD="another-long-passphrase",
    )
    assert out == "create_admin_user: ops already existed; password reset\n"
    assert get_user_model().objects.get(username="ops").check_password("another-long-passphrase")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "Set OTARI_ADMIN_USERNAME and OTARI_ADMIN_PASSWORD"),
        ({"OTARI_ADMIN_USERNAME": "ops"}, "Set OTARI_ADMIN_PASSWORD"),
        (
            {"OTARI_ADMIN_USERNAME": "ops", "OTARI_ADMIN_PASSWORD": "123"},
            "This password is too short",
        ),
    ],
)
def test_refuses_missing_or_weak_settings(monkeypatch, env, message):
    with pytest.raises(CommandError, match=message):
        _run(monkeypatch, **env)
    assert not get_user_model().objects.exists()
