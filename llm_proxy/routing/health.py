"""Target health: a target that failed OTARI_ROUTING_FAILURE_THRESHOLD times in a row is
skipped for OTARI_ROUTING_COOLDOWN_SECONDS (docs/ROUTING.md). plan() drops it with the
reason "cooling_down", unless every target of the request is cooling down.

Shared by every process through Redis when OTARI_ROUTING_REDIS_URL is set (by default
the rate limits' Redis), per process otherwise. In Redis, per target:

- `<prefix>f:<target>`: the failures in a row (INCR; a success deletes it). It expires
  after 10 cooldowns without a failure, so failures far apart are not "in a row".
- `<prefix>c:<target>`: present while it cools down (SET with PX = the cooldown, so
  Redis ends it, on Redis's clock); its value is the end, in epoch ms, for explain.

A failure is one Lua script (count, and at the threshold start the cooldown: atomic, so
two processes failing at once cannot lose a count); `cooling()` is one MGET for all of a
request's targets. The count is not reset when a cooldown starts or ends: a target that
comes back and fails again cools down again at once (half-open), until a success.

A success costs a round trip only when this process has seen the target failing (in a
cooling() answer or its own record()), so a healthy gateway pays one MGET per routed
request and nothing more. Redis unreachable: fail open (nothing cools down), logged once
per outage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from llm_proxy.ratelimit import redis_client

logger = logging.getLogger(__name__)

_FAIL_LUA = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if n >= tonumber(ARGV[1]) then
  local t = redis.call('TIME')
  local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
  redis.call('SET', KEYS[2], ends, 'PX', ARGV[2])
end
return n
"""
_TIMEOUT_S = 0.5
_ERRORS = (RedisError, OSError)

# Targets this process has seen failing: the only ones a success needs to reset.
_suspect: set[str] = set()
_redis_down = False


def _cooldown() -> timedelta:
    return timedelta(seconds=settings.OTARI_ROUTING_COOLDOWN_SECONDS)


def _keys(target: str) -> tuple[str, str]:
    prefix = settings.OTARI_ROUTING_KEY_PREFIX
    return f"{prefix}f:{target}", f"{prefix}c:{target}"


def _until(raw: bytes | str | None) -> datetime | None:
    return None if raw is None else datetime.fromtimestamp(int(raw) / 1000, tz=UTC)


def _failed(exc: BaseException) -> None:
    global _redis_down
    if not _redis_down:
        _redis_down = True
        logger.warning(
            "Routing health not shared: Redis is unreachable (%s); no target cools down "
            "until it is back",
            type(exc).__name__,
        )


def _recovered() -> None:
    global _redis_down
    if _redis_down:
        _redis_down = False
        logger.info("Routing health: Redis reachable again")


# --- per process, without Redis ------------------------------------------------------------


@dataclass(slots=True)
class _State:
    failures: int
    last_failure: datetime
    cooling_until: datetime | None = None


_memory: dict[str, _State] = {}


def _memory_cooling(targets: Iterable[str]) -> dict[str, datetime]:
    now = timezone.now()
    out = {}
    for target in targets:
        state = _memory.get(target)
        if state is not None and state.cooling_until is not None and state.cooling_until > now:
            out[target] = state.cooling_until
    return out


def _memory_record(target: str, ok: bool) -> None:
    if ok:
        _memory.pop(target, None)
        return
    now = timezone.now()
    state = _memory.get(target)
    if state is None or now - state.last_failure > 10 * _cooldown():
        state = _memory[target] = _State(failures=0, last_failure=now)
    state.failures += 1
    state.last_failure = now
    if state.failures >= settings.OTARI_ROUTING_FAILURE_THRESHOLD:
        state.cooling_until = now + _cooldown()


def reset() -> None:
    """Forget this process's state (tests; the Redis keys are the tests' to flush)."""
    global _redis_down
    _redis_down = False
    _memory.clear()
    _suspect.clear()


# --- the request path ------------------------------------------------------------------------


def _note_suspects(targets: list[str], counts: list[bytes | None]) -> None:
    for target, count in zip(targets, counts, strict=True):
        if count is not None:
            _suspect.add(target)


async def cooling(targets: list[str]) -> dict[str, datetime]:
    """The targets among `targets` cooling down, each with when its cooldown ends (UTC).
    One round trip (MGET) with Redis; {} when Redis is unreachable."""
    url = settings.OTARI_ROUTING_REDIS_URL
    if not targets:
        return {}
    if not url:
        return _memory_cooling(targets)
    keys = [key for t in targets for key in _keys(t)]
    try:
        values = await redis_client(url).mget(keys)
    except _ERRORS as exc:
        _failed(exc)
        return {}
    _recovered()
    _note_suspects(targets, values[0::2])
    ends = zip(targets, values[1::2], strict=True)
    return {t: until for t, raw in ends if (until := _until(raw)) is not None}


async def record(target: str, *, ok: bool) -> None:
    """One attempt's outcome: a failure counts (and at the threshold starts the
    cooldown), a success resets the target."""
    url = settings.OTARI_ROUTING_REDIS_URL
    if not url:
        _memory_record(target, ok)
        return
    if ok and target not in _suspect:
        return
    fail_key, cool_key = _keys(target)
    client = redis_client(url)
    try:
        if ok:
            await client.delete(fail_key, cool_key)
            _suspect.discard(target)
        else:
            _suspect.add(target)
            # EVALSHA (EVAL the first time a server does not know the script).
            await client.register_script(_FAIL_LUA)(
                keys=[fail_key, cool_key],
                args=[
                    settings.OTARI_ROUTING_FAILURE_THRESHOLD,
                    settings.OTARI_ROUTING_COOLDOWN_SECONDS * 1000,
                    settings.OTARI_ROUTING_COOLDOWN_SECONDS * 10_000,
                ],
            )
    except _ERRORS as exc:
        _failed(exc)
        return
    _recovered()


# --- explain (synchronous: the management API and command) --------------------------------------

_sync_clients: dict[str, redis.Redis] = {}


def cooling_sync(targets: list[str]) -> dict[str, datetime]:
    """cooling() for synchronous callers (explain): the same state, a blocking client."""
    url = settings.OTARI_ROUTING_REDIS_URL
    if not targets:
        return {}
    if not url:
        return _memory_cooling(targets)
    client = _sync_clients.get(url)
    if client is None:
        client = _sync_clients[url] = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
        )
    try:
        values = client.mget([_keys(t)[1] for t in targets])
    except _ERRORS as exc:
        _failed(exc)
        return {}
    _recovered()
    ends = zip(targets, values, strict=True)
    return {t: until for t, raw in ends if (until := _until(raw)) is not None}
