"""Credentials (docs/SPEC.md §1): API keys and the master key. Only hashes are stored;
a secret is returned once, when it is made."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from budgets.models import APIKey, GatewayUser, MasterKey, Workspace
from budgets.services.accounts import UNSET, rate_limits_check
from budgets.services.tenancy import default_workspace_ensure
from common.credentials import API_KEY_PREFIX, MASTER_KEY_PREFIX
from common.exceptions import Conflict
from common.history import history_record


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_api_key_secret() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(48)


def api_key_create(
    *,
    user: GatewayUser,
    key_name: str = "",
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    exclude_from_budget: bool = False,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    workspace: Workspace | None = None,
) -> tuple[APIKey, str]:
    """Create a key for `user` in `workspace` (None: the default workspace), fixed for
    the key's life. Returns the key and its secret, which is not kept."""
    rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    secret = _new_api_key_secret()
    key = APIKey.objects.create(
        user=user,
        # Recorded, not left null, so that the workspace's keys are one indexed filter.
        workspace=workspace or default_workspace_ensure(),
        key_hash=secret_hash(secret),
        key_prefix=secret[:10],
        key_suffix=secret[-4:],
        key_name=key_name,
        expires_at=expires_at,
        allowed_models=allowed_models,
        exclude_from_budget=exclude_from_budget,
        metadata=metadata or {},
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
    )
    return key, secret


def api_key_create_with_user(
    *,
    key_name: str = "",
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    exclude_from_budget: bool = False,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    workspace: Workspace | None = None,
) -> tuple[APIKey, str]:
    """Create a key together with a user of its own (`apikey-<hex>`, aliased after the
    key's name), for a key created without a user: every key bills exactly one user.
    Both rows or neither. The rate limits are the key's (its user has none)."""
    rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    with transaction.atomic(durable=True):
        user = GatewayUser.objects.create(
            user_id=f"apikey-{uuid.uuid4().hex}", alias=key_name, metadata={}
        )
        return api_key_create(
            user=user,
            key_name=key_name,
            expires_at=expires_at,
            allowed_models=allowed_models,
            exclude_from_budget=exclude_from_budget,
            metadata=metadata,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            workspace=workspace,
        )


def api_key_update(
    *,
    key_id: uuid.UUID,
    key_name: str = UNSET,
    is_active: bool = UNSET,
    expires_at: datetime | None = UNSET,
    allowed_models: list[str] | None = UNSET,
    exclude_from_budget: bool = UNSET,
    metadata: dict[str, Any] = UNSET,
    rpm_limit: int | None = UNSET,
    tpm_limit: int | None = UNSET,
) -> APIKey:
    """Change a key's settings (never its secret: see api_key_rotate)."""
    rate_limits_check(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    changes = {
        name: value
        for name, value in (
            ("key_name", key_name),
            ("is_active", is_active),
            ("expires_at", expires_at),
            ("allowed_models", allowed_models),
            ("exclude_from_budget", exclude_from_budget),
            ("metadata", metadata),
            ("rpm_limit", rpm_limit),
            ("tpm_limit", tpm_limit),
        )
        if value is not UNSET
    }
    with transaction.atomic(durable=True):
        key = APIKey.objects.select_for_update().get(pk=key_id)
        if changes:
            APIKey.objects.filter(pk=key.pk).update(**changes, updated_at=timezone.now())
            key.refresh_from_db()
            history_record(key)
        return key


def api_key_revoke(*, key_id: uuid.UUID) -> APIKey:
    """Deactivate a key: it stops working on the next request, in every process."""
    return api_key_update(key_id=key_id, is_active=False)


def api_key_rotate(*, key: APIKey) -> str:
    """Give the key a new secret; the old one stops working at once."""
    secret = _new_api_key_secret()
    with transaction.atomic(durable=True):
        APIKey.objects.filter(pk=key.pk).update(
            key_hash=secret_hash(secret),
            key_prefix=secret[:10],
            key_suffix=secret[-4:],
            updated_at=timezone.now(),
        )
        key.refresh_from_db()
        # The version shows the new prefix and suffix; the hash is never versioned.
        history_record(key)
    return secret


def master_key_matches(secret: str) -> bool:
    """Constant-time check of a presented master key (env var, or the stored hash)."""
    configured = settings.OTARI_MASTER_KEY
    if configured:
        return hmac.compare_digest(secret.encode(), configured.encode())
    stored = _stored_master_key_hash()
    return stored is not None and hmac.compare_digest(secret_hash(secret), stored)


# The stored hash is read again after this long, so that a key replaced by
# `manage.py rotate_master_key` takes effect in every running process, with no restart.
MASTER_KEY_RECHECK_SECONDS = 5.0
# (hash, when it was read, time.monotonic()); the one entry of a per-process cache.
_master_key_hash_cache: list[tuple[str | None, float]] = []


def _stored_master_key_hash() -> str | None:
    now = time.monotonic()
    if not _master_key_hash_cache or now - _master_key_hash_cache[0][1] >= (
        MASTER_KEY_RECHECK_SECONDS
    ):
        stored = MasterKey.objects.values_list("key_hash", flat=True).first()
        _master_key_hash_cache[:] = [(stored, now)]
    return _master_key_hash_cache[0][0]


def master_key_rotate() -> str:
    """Replace the generated master key (lost, or seen by someone it should not have
    been): the new secret is returned once, to be printed; only its hash is stored, and
    the old key stops working (in other processes within MASTER_KEY_RECHECK_SECONDS).

    A master key configured with OTARI_MASTER_KEY is the operator's to change there:
    refused with `Conflict`.
    """
    if settings.OTARI_MASTER_KEY:
        raise Conflict(
            "The master key is set by OTARI_MASTER_KEY: change that variable and restart"
        )
    master = MASTER_KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic(durable=True):
        MasterKey.objects.all().delete()
        MasterKey.objects.create(key_hash=secret_hash(master))
    _master_key_hash_cache.clear()
    return master


@dataclass(frozen=True)
class BootstrapResult:
    master_key: str | None
    api_key: str | None


def credentials_bootstrap() -> BootstrapResult:
    """First start: generate a master key (unless configured) and a `bootstrap` API key
    for user `default` (when there are no API keys at all). Secrets are returned once to
    be printed, and only their hashes are stored. Idempotent."""
    with transaction.atomic(durable=True):
        master = None
        if not settings.OTARI_MASTER_KEY and not MasterKey.objects.exists():
            master = MASTER_KEY_PREFIX + secrets.token_urlsafe(32)
            MasterKey.objects.create(key_hash=secret_hash(master))
        api_secret = None
        if not APIKey.objects.exists():
            user = GatewayUser.objects.filter(pk="default").first()
            if user is None:
                user = GatewayUser.objects.create(user_id="default", alias="default")
            _, api_secret = api_key_create(user=user, key_name="bootstrap")
        return BootstrapResult(master_key=master, api_key=api_secret)
