"""Rate limits in the console (issue 8, item 3): the user and key forms edit `rpm_limit`
and `tpm_limit` through budgets.services, refuse bad values with a clear form error, and
the changelists show them."""

from __future__ import annotations

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry

from budgets.models import APIKey, GatewayUser
from tests.admin.conftest import admin_url
from tests.factories import make_key, make_user

pytestmark = pytest.mark.django_db

RPM_ERROR = "Enter a whole number from 1 to 1,000,000,000, or leave it empty for no limit."
TPM_ERROR = "Enter a whole number from 1 to 1,000,000,000,000, or leave it empty for no limit."


def _user_form(user: GatewayUser, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "alias": user.alias,
        "budget": user.budget_id or "",
        "topup_usd": "0",
        "allowed_models": "null",
        "metadata": "{}",
        "rpm_limit": "" if user.rpm_limit is None else str(user.rpm_limit),
        "tpm_limit": "" if user.tpm_limit is None else str(user.tpm_limit),
    }
    data.update(overrides)
    return data


def _key_form(key: APIKey, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "key_name": key.key_name,
        "is_active": "on",
        "allowed_models": "null",
        "metadata": "{}",
        "rpm_limit": "" if key.rpm_limit is None else str(key.rpm_limit),
        "tpm_limit": "" if key.tpm_limit is None else str(key.tpm_limit),
    }
    data.update(overrides)
    return data


def _errors(response) -> dict[str, list[str]]:
    return response.context["adminform"].form.errors


# --- users -----------------------------------------------------------------------------


def test_adding_a_user_with_limits(admin_client):
    response = admin_client.post(
        admin_url(GatewayUser, "add"),
        {
            "user_id": "ivy",
            "topup_usd": "0",
            "allowed_models": "null",
            "metadata": "{}",
            "rpm_limit": "60",
            "tpm_limit": "100000",
        },
    )

    assert response.status_code == 302
    user = GatewayUser.objects.get(pk="ivy")
    assert (user.rpm_limit, user.tpm_limit) == (60, 100_000)
    assert LogEntry.objects.get().action_flag == ADDITION


def test_changing_and_clearing_a_users_limits(admin_client):
    user = make_user(user_id="jay", alias="Jay", rpm_limit=10)
    page = admin_client.get(admin_url(user, "change")).content.decode()
    assert 'name="rpm_limit"' in page
    assert 'name="tpm_limit"' in page
    assert "Rate limits" in page

    response = admin_client.post(
        admin_url(user, "change"), _user_form(user, rpm_limit="", tpm_limit="5000")
    )

    assert response.status_code == 302
    user.refresh_from_db()
    assert (user.rpm_limit, user.tpm_limit, user.alias) == (None, 5000, "Jay")
    entry = LogEntry.objects.get()
    assert entry.action_flag == CHANGE
    assert "Requests per minute" in entry.get_change_message()
    assert "Tokens per minute" in entry.get_change_message()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rpm_limit", "0", RPM_ERROR),
        ("rpm_limit", "-3", RPM_ERROR),
        ("rpm_limit", "1.5", RPM_ERROR),
        ("rpm_limit", "sixty", RPM_ERROR),
        ("rpm_limit", "1000000001", RPM_ERROR),
        ("tpm_limit", "0", TPM_ERROR),
        ("tpm_limit", "1000000000001", TPM_ERROR),
        ("tpm_limit", "9" * 40, TPM_ERROR),
    ],
)
def test_bad_user_limits_are_refused_on_the_form(admin_client, field, value, message):
    user = make_user(user_id="kim", rpm_limit=10, tpm_limit=1000)

    response = admin_client.post(admin_url(user, "change"), _user_form(user, **{field: value}))

    assert response.status_code == 200
    assert _errors(response)[field] == [message]
    user.refresh_from_db()
    assert (user.rpm_limit, user.tpm_limit) == (10, 1000)
    assert not LogEntry.objects.exists()

    # The add form applies the same rule.
    added = admin_client.post(
        admin_url(GatewayUser, "add"),
        {
            "user_id": "lee",
            "topup_usd": "0",
            "allowed_models": "null",
            "metadata": "{}",
            field: value,
        },
    )
    assert _errors(added)[field] == [message]
    assert not GatewayUser.objects.filter(pk="lee").exists()


def test_user_changelist_shows_the_limits(admin_client):
    make_user(user_id="both", rpm_limit=60, tpm_limit=100_000)
    make_user(user_id="tokens", tpm_limit=2_500)
    make_user(user_id="none")

    response = admin_client.get(admin_url(GatewayUser, "changelist"))

    html = response.content.decode()
    assert "60 rpm · 100,000 tpm" in html
    assert "2,500 tpm" in html
    assert "Rate limits" in html
    rows = {user.pk: user for user in response.context["cl"].result_list}
    assert set(rows) == {"both", "tokens", "none"}


# --- keys ------------------------------------------------------------------------------


def test_adding_a_key_with_limits(admin_client):
    make_user(user_id="max", rpm_limit=100)

    response = admin_client.post(
        admin_url(APIKey, "add"),
        {
            "user": "max",
            "key_name": "ci",
            "allowed_models": "null",
            "metadata": "{}",
            "rpm_limit": "2",
            "tpm_limit": "",
        },
    )

    assert response.status_code == 200  # the page that shows the secret once
    key = APIKey.objects.get()
    assert (key.rpm_limit, key.tpm_limit) == (2, None)
    assert GatewayUser.objects.get(pk="max").rpm_limit == 100


def test_changing_a_keys_limits(admin_client):
    key, _ = make_key(make_user(), key_name="bot", tpm_limit=800)

    response = admin_client.post(
        admin_url(key, "change"), _key_form(key, rpm_limit="30", tpm_limit="")
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.rpm_limit, key.tpm_limit, key.key_name, key.is_active) == (30, None, "bot", True)
    assert LogEntry.objects.get().action_flag == CHANGE


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rpm_limit", "0", RPM_ERROR),
        ("rpm_limit", "2.5", RPM_ERROR),
        ("tpm_limit", "-1", TPM_ERROR),
        ("tpm_limit", "lots", TPM_ERROR),
    ],
)
def test_bad_key_limits_are_refused_on_the_form(admin_client, field, value, message):
    key, _ = make_key(make_user(user_id="ned"), rpm_limit=5)

    response = admin_client.post(admin_url(key, "change"), _key_form(key, **{field: value}))

    assert response.status_code == 200
    assert _errors(response)[field] == [message]
    key.refresh_from_db()
    assert (key.rpm_limit, key.tpm_limit) == (5, None)

    added = admin_client.post(
        admin_url(APIKey, "add"),
        {"user": "ned", "allowed_models": "null", "metadata": "{}", field: value},
    )
    assert _errors(added)[field] == [message]
    assert APIKey.objects.count() == 1


def test_key_changelist_shows_the_limits(admin_client):
    user = make_user()
    make_key(user, key_name="limited", rpm_limit=1_200)
    make_key(user, key_name="free")

    html = admin_client.get(admin_url(APIKey, "changelist")).content.decode()

    assert "1,200 rpm" in html
    assert "Rate limits" in html
