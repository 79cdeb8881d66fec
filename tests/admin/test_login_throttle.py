"""The console's login throttle, through the login page: failed logins are counted per
username and per client address, logged one line each, and past the limit refused for a
cooldown, right password or not (common/login_throttle.py, docs/ADMIN.md)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core.cache import cache
from django.test import Client

LOGIN = "/admin/login/?next=/admin/"
PASSWORD = "correct-horse-battery-7"
WRONG = "wrong-password-canary-93b1"
THROTTLED = "Too many failed login attempts"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fresh_counts():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def ops(django_user_model):
    return django_user_model.objects.create_user("ops", password=PASSWORD, is_staff=True)


def login(username: str, password: str, address: str = "203.0.113.7"):
    """POST the login form from `address` as a browser would; the response."""
    client = Client(REMOTE_ADDR=address)
    return client.post(LOGIN, {"username": username, "password": password})


def logged_in(response) -> bool:
    return response.status_code == 302 and response["Location"] == "/admin/"


def login_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otari.login"]


@pytest.mark.django_db
def test_five_failures_lock_the_username_even_for_the_right_password(ops, caplog, settings):
    caplog.set_level(logging.INFO)
    for _ in range(5):
        response = login("ops", WRONG)
        assert response.status_code == 200
        assert "Please enter the correct username and password" in response.content.decode()
    response = login("ops", PASSWORD)
    assert response.status_code == 200
    page = response.content.decode()
    assert THROTTLED in page
    assert "Try again in 15 minute(s)." in page
    assert "_auth_user_id" not in response.client.session

    lines = login_lines(caplog)
    assert len(lines) == 6
    assert lines[0] == (
        "Failed console login for username 'ops' from 203.0.113.7 (1/1 of 5 failures)"
    )
    assert lines[4].endswith("(5/5 of 5 failures); locked out for 900 s (user and addr)")
    assert lines[5] == (
        "Refused console login for username 'ops' from 203.0.113.7: throttled for 900 more s"
    )
    assert not any(WRONG in line or PASSWORD in line for line in lines)
    assert not any(WRONG in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_the_password_is_not_checked_while_throttled(ops, monkeypatch):
    for _ in range(5):
        login("ops", WRONG)
    checked = []
    monkeypatch.setattr(
        "django.contrib.auth.backends.ModelBackend.authenticate",
        lambda *args, **kwargs: checked.append(1),
    )
    assert THROTTLED in login("ops", PASSWORD).content.decode()
    assert checked == []


@pytest.mark.django_db
def test_a_locked_username_from_any_address_and_a_locked_address_for_any_username(
    ops, django_user_model
):
    django_user_model.objects.create_user("dana", password=PASSWORD, is_staff=True)
    for _ in range(5):
        login("ops", WRONG, address="198.51.100.1")
    # The username is locked wherever the attempt comes from.
    assert THROTTLED in login("ops", PASSWORD, address="192.0.2.55").content.decode()
    # Another username from another address is not affected.
    assert logged_in(login("dana", PASSWORD, address="192.0.2.66"))
    # The guessing address is locked for every username.
    assert THROTTLED in login("dana", PASSWORD, address="198.51.100.1").content.decode()


@pytest.mark.django_db
def test_an_address_guessing_many_usernames_is_locked(ops):
    for name in ("a1", "b2", "c3", "d4", "e5"):
        login(name, WRONG, address="198.51.100.9")
    assert THROTTLED in login("ops", PASSWORD, address="198.51.100.9").content.decode()
    assert logged_in(login("ops", PASSWORD, address="192.0.2.10"))


@pytest.mark.django_db
def test_the_cooldown_expires(ops, caplog):
    caplog.set_level(logging.INFO)
    with time_machine.travel(START, tick=False) as clock:
        for _ in range(5):
            login("ops", WRONG)
        clock.move_to(START + timedelta(minutes=14, seconds=59))
        response = login("ops", PASSWORD)
        assert THROTTLED in response.content.decode()
        assert "Try again in 1 minute(s)." in response.content.decode()
        clock.move_to(START + timedelta(minutes=15, seconds=1))
        assert logged_in(login("ops", PASSWORD))


@pytest.mark.django_db
def test_failures_outside_the_window_do_not_add_up(ops):
    with time_machine.travel(START, tick=False) as clock:
        for _ in range(4):
            login("ops", WRONG)
        clock.move_to(START + timedelta(minutes=15, seconds=1))
        for _ in range(4):
            login("ops", WRONG)
        assert logged_in(login("ops", PASSWORD))


@pytest.mark.django_db
def test_a_success_resets_the_usernames_count(ops, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(4):
        login("ops", WRONG, address="192.0.2.1")
    assert logged_in(login("ops", PASSWORD, address="192.0.2.1"))
    # Four more from another address: the username's count starts again from zero.
    for _ in range(4):
        login("ops", WRONG, address="192.0.2.2")
    assert logged_in(login("ops", PASSWORD, address="192.0.2.2"))
    assert login_lines(caplog)[-1].startswith(
        "Failed console login for username 'ops' from 192.0.2.2 (4/4 of 5"
    )


@pytest.mark.django_db
def test_the_limit_is_a_setting_and_the_username_is_logged_escaped(ops, caplog, settings):
    caplog.set_level(logging.INFO)
    settings.OTARI_LOGIN_FAILURE_LIMIT = 2
    forged = "ops\r\n2026-01-01 INFO otari.login forged line"
    login(forged, WRONG)
    [line] = login_lines(caplog)
    assert "\n" not in line
    assert "\r" not in line
    assert "'ops\\r\\n2026-01-01 INFO otari.login forged line'" in line
    login("ops", WRONG)
    assert THROTTLED in login("ops", PASSWORD).content.decode()


@pytest.mark.django_db
def test_with_redis_every_process_shares_the_counts(ops, settings, redis_url):
    """With Redis configured, the lockout is a key there, with the cooldown as its expiry:
    what every worker process and host reads."""
    import redis

    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            "KEY_PREFIX": "otari",
        }
    }
    for _ in range(5):
        login("ops", WRONG)
    client = redis.Redis.from_url(redis_url)
    locked = client.keys("otari:*login-throttle:*:locked:*")
    assert len(locked) == 2  # the username and the address
    assert all(890 < client.ttl(key) <= 900 for key in locked)
    assert THROTTLED in login("ops", PASSWORD).content.decode()
    client.close()
