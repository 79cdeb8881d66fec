"""Who is calling a generation endpoint (docs/SPEC.md §1)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async

from budgets import rules
from budgets.exceptions import (
    ExpiredAPIKey,
    InactiveAPIKey,
    InvalidAPIKey,
    UnknownUser,
)
from budgets.selectors import Caller, caller_load
from budgets.services import accounts, keys, periods
from common.exceptions import BadRequest
from llm_proxy import platform

if TYPE_CHECKING:
    pass


async def authenticate(
    *, credential: str, named_user: str | None, model_key: str, now: datetime
) -> Caller:
    """The caller behind a credential, with the model's current price.

    A `gw-` key bills its own user. The master key bills the user the request names
    (400 without one, 404 for an unknown one). Anything else is a 401 whose message says
    what was wrong with the key, never the key.
    """
    if credential.startswith(keys.API_KEY_PREFIX):
        key_hash = keys.secret_hash(credential)
        _kept.pop((key_hash, model_key), None)
        caller = await _caller_load(key_hash=key_hash, model_key=model_key, now=now)
        if caller is None:
            raise InvalidAPIKey
        if not caller.key_active or caller.deleted:
            raise InactiveAPIKey
        if caller.key_expires_at is not None and caller.key_expires_at <= now:
            raise ExpiredAPIKey
        _keep(key_hash, model_key, caller, now)
        return caller
    if await sync_to_async(keys.master_key_matches)(credential):
        if named_user is None:
            raise BadRequest(
                "Requests made with the master key must name the user to bill",
                code="user_required",
                param="user",
            )
        caller = await _caller_load(user_id=named_user, model_key=model_key, now=now)
        if caller is None or caller.deleted:
            raise UnknownUser
        return caller
    raise InvalidAPIKey


# ---------------------------------------------------------------------------------------
# Kept callers. A process keeps the caller of each (key, model) it served, so that the next
# request of that key can skip the load and go straight to ADMIT_CHECKED, which takes the
# hold only if the caller's configuration is still the kept one (its fingerprint,
# budgets.selectors) and otherwise takes nothing: the request is then admitted again
# from a fresh load (llm_proxy.pipeline.admission). The kept money (spend, reserved) is
# not trusted for anything: ADMIT judges the locked row. Kept only for what ADMIT_CHECKED
# can vouch for alone: a caller who would take a hold (priced, billed), with no rate
# limits (the limiter counts before the hold, and could not be undone) and a current
# period.

_KEPT_MAX = 10_000
_kept: dict[tuple[str, str], Caller] = {}


def _keep(key_hash: str, model_key: str, caller: Caller, now: datetime) -> None:
    if (
        caller.fingerprint is None
        or not model_key
        or caller.blocked
        or caller.exclude_from_budget
        or caller.rates is None
        or caller.rates.is_free
        or caller.has_rate_limits
        or not rules.period_current(caller.next_budget_reset_at, now)
    ):
        return
    if len(_kept) >= _KEPT_MAX:
        _kept.pop(next(iter(_kept)))
    _kept[key_hash, model_key] = caller


def kept_caller(*, credential: str, model_key: str, now: datetime) -> tuple[Caller, str] | None:
    """The kept caller of a `gw-` key for this model and the key's hash, when it may still
    be current: its key not past its expiry, its period not ended (ADMIT_CHECKED, given
    the hash, verifies the rest)."""
    if not credential.startswith(keys.API_KEY_PREFIX):
        return None
    key_hash = keys.secret_hash(credential)
    caller = _kept.get((key_hash, model_key))
    if caller is None:
        return None
    if caller.key_expires_at is not None and caller.key_expires_at <= now:
        return None
    if not rules.period_current(caller.next_budget_reset_at, now):
        return None
    return caller, key_hash


async def is_platform_user_token(credential: str) -> bool:
    """In platform mode (docs/SPEC.md §7), a credential that is neither a `gw-` key nor the
    master key is a platform user token, for the platform to judge."""
    if not platform.enabled() or credential.startswith(keys.API_KEY_PREFIX):
        return False
    return not await sync_to_async(keys.master_key_matches)(credential)


async def authenticate_platform_user(*, user_id: str, now: datetime) -> Caller:
    """The local user a platform resolve named: held and billed like any other, created
    on first sight. A user deleted here stays refused (404): the local operator's word."""
    caller = await _caller_load(user_id=user_id, model_key="", now=now)
    if caller is None:
        await sync_to_async(accounts.user_ensure)(user_id=user_id)
        caller = await _caller_load(user_id=user_id, model_key="", now=now)
    if caller is None or caller.deleted:
        raise UnknownUser
    return caller


async def _caller_load(
    *, key_hash: str | None = None, user_id: str | None = None, model_key: str, now: datetime
) -> Caller | None:
    caller = await caller_load(key_hash=key_hash, user_id=user_id, model_key=model_key, now=now)
    if (
        caller is not None
        and caller.next_budget_reset_at is not None
        and (caller.next_budget_reset_at <= now)
    ):
        # The user's period has ended: roll it before anything judges the budget (§3.3).
        await sync_to_async(periods.user_period_roll)(user_id=caller.user_id, now=now)
        caller = await caller_load(key_hash=key_hash, user_id=user_id, model_key=model_key, now=now)
    return caller


async def authenticate_listing(*, credential: str, now: datetime) -> Caller | None:
    """For endpoints that bill nobody (`GET /v1/models`): the key's caller, or None for
    the master key."""
    if credential.startswith(keys.API_KEY_PREFIX):
        return await authenticate(credential=credential, named_user=None, model_key="", now=now)
    if await sync_to_async(keys.master_key_matches)(credential):
        return None
    raise InvalidAPIKey


def model_allowed(allowed: list[str] | None, model_key: str) -> bool:
    """Null allows any model, [] none; entries are `provider:model` or end in `*`."""
    if allowed is None:
        return True
    for entry in allowed:
        if not isinstance(entry, str):
            continue
        if entry == model_key or (entry.endswith("*") and model_key.startswith(entry[:-1])):
            return True
    return False
