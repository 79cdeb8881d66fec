"""Rate limits per user and per API key: requests and tokens per minute, counted in Redis
so that every process and host shares them (docs/OBSERVABILITY.md has the full rules).

- A limited party (a *subject*: a user with `rpm_limit`/`tpm_limit`, or an API key with
  its own) has a fixed window of OTARI_RATELIMIT_WINDOW_SECONDS (60, so the limits are
  per minute). The window starts with the subject's first request and ends one window
  later; the next request after that starts a new one.
- A request is admitted when, for every subject that applies (the user's limits, and the
  key's), the window's request count is below `rpm_limit` and its token count below
  `tpm_limit`. Admission then adds, to every such subject, one request and the request's
  token estimate (ceil(prompt chars / 4) + max output tokens, as for the hold), all in one
  atomic step: so exactly `rpm_limit` requests are admitted per window, however many
  processes race. A refused request counts nothing.
- When the request ends, its tokens are corrected to what it used (0 when the provider
  was never reached or failed), as long as its window is still the current one. The token
  count can therefore pass `tpm_limit` by at most one request's tokens: the request that
  was admitted while the count was still below it.
- Over a limit: 429 in the endpoint's error shape, `Retry-After` = seconds to the end of
  the window that refused.

Cost on the hot path: a caller without limits (the caller row says so) costs nothing
here. A limited one costs one Redis round trip at admission (one Lua script: check and
count, atomically, for user and key together) and at most one when it ends (the token
correction; none when the estimate was exact). Redis time is used, so the hosts' clocks
do not matter.

Without Redis (OTARI_RATELIMIT_REDIS_URL unset and CELERY_BROKER_URL not Redis) the same
rules are applied per process, and a warning says so at startup: with N worker
processes a caller gets up to N times its limits. If Redis is configured but fails, the
request is let through (rate limits protect capacity; budgets, in the database, still
protect money), a warning is logged and `otari_ratelimit_backend_errors_total` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from common.exceptions import GatewayError
from otari import metrics

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from budgets.selectors import Caller

logger = logging.getLogger(__name__)

# A rate-limit check must never hold a request up for long: past this, Redis counts as
# down and the request goes through.
_REDIS_TIMEOUT_S = 0.5
_FAILURE_LOG_INTERVAL_S = 60.0
REFUSED_REQUESTS, REFUSED_TOKENS = 1, 2


@dataclass(frozen=True, slots=True)
class Subject:
    """One limited party: the user, or the API key."""

    scope: str  # "user" | "key"
    key: str  # its window's Redis key
    rpm: int | None
    tpm: int | None


@dataclass(slots=True)
class Window:
    """A subject's current window, as of one step."""

    subject: Subject
    start_ms: int
    requests: int
    tokens: int
    reset_ms: int  # until the window ends


@dataclass(slots=True)
class RateAdmission:
    """What admission counted for a request, to correct when it ends."""

    windows: list[Window]
    tokens: int


@dataclass(frozen=True, slots=True)
class _Step:
    refused: int  # 1-based index of the refusing subject; 0 = admitted
    kind: int  # REFUSED_REQUESTS | REFUSED_TOKENS
    now_ms: int
    states: list[tuple[int, int, int]]  # per subject: window start, requests, tokens


class RateLimitExceeded(GatewayError):
    status = 429
    code = "rate_limit_exceeded"
    message = "Rate limit exceeded"

    def __init__(self, *, window: Window, limit: str, windows: list[Window]) -> None:
        self.scope = window.subject.scope
        self.limit = limit
        who = "this API key" if self.scope == "key" else "this user"
        allowed = (
            f"{window.subject.rpm} requests" if limit == "rpm" else f"{window.subject.tpm} tokens"
        )
        seconds = settings.OTARI_RATELIMIT_WINDOW_SECONDS
        per = "per minute" if seconds == 60 else f"per {seconds} s"
        retry_after = max(1, math.ceil(window.reset_ms / 1000))
        headers = rate_headers(windows, refused=window, refused_limit=limit)
        headers["Retry-After"] = str(retry_after)
        super().__init__(
            f"Rate limit exceeded: {who} may make {allowed} {per}; retry in {retry_after} s"
            if limit == "rpm"
            else f"Rate limit exceeded: {who} may use {allowed} {per}; retry in {retry_after} s",
            headers=headers,
        )


# --- the two steps, atomically in Redis ----------------------------------------------------

# KEYS: the subjects' window hashes {s: start (ms, Redis clock), r: requests, t: tokens}.
# ARGV: window (ms), tokens to count, then per subject its request and token limit
# (-1: none). Returns {refused subject (0: admitted), kind, now, then per subject
# start, requests, tokens}: counted when admitted, as found when refused.
_ADMIT_LUA = """
local window = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local states = {}
local refused, kind = 0, 0
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 's', 'r', 't')
  local start = tonumber(v[1])
  local requests, used = tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local fresh = start == nil or now >= start + window
  if fresh then start, requests, used = now, 0, 0 end
  states[i] = {start, requests, used, fresh}
  if refused == 0 then
    local rpm, tpm = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
    if rpm >= 0 and requests >= rpm then
      refused, kind = i, 1
    elseif tpm >= 0 and used >= tpm then
      refused, kind = i, 2
    end
  end
end
local out = {refused, kind, now}
for i, key in ipairs(KEYS) do
  local s = states[i]
  if refused == 0 then
    if s[4] then
      redis.call('DEL', key)
      redis.call('HSET', key, 's', s[1], 'r', 1, 't', tokens)
      redis.call('PEXPIRE', key, window)
    else
      redis.call('HINCRBY', key, 'r', 1)
      redis.call('HINCRBY', key, 't', tokens)
    end
    s[2], s[3] = s[2] + 1, s[3] + tokens
  end
  table.insert(out, s[1])
  table.insert(out, s[2])
  table.insert(out, s[3])
end
return out
"""

# KEYS: the windows counted at admission. ARGV: the token correction (may be negative),
# then per subject the start of the window it was counted in; a window that has since
# ended is left alone. Returns {0, 0, now, then per subject start, requests, tokens of
# its current window (0, 0, 0 when there is none)}.
_CORRECT_LUA = """
local delta = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local out = {0, 0, now}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 's', 'r', 't')
  local start = tonumber(v[1])
  local requests, used = tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if start ~= nil and start == tonumber(ARGV[1 + i]) then
    used = redis.call('HINCRBY', key, 't', delta)
    if used < 0 then
      redis.call('HSET', key, 't', 0)
      used = 0
    end
  end
  table.insert(out, start or 0)
  table.insert(out, requests)
  table.insert(out, used)
end
return out
"""


def _step(reply: object) -> _Step:
    if not isinstance(reply, list):
        raise RedisError(f"unexpected reply {reply!r:.100}")
    values = [int(value) for value in reply]
    states = [tuple(values[i : i + 3]) for i in range(3, len(values), 3)]
    return _Step(refused=values[0], kind=values[1], now_ms=values[2], states=states)


class _Backend(Protocol):
    async def admit(self, subjects: list[Subject], tokens: int, window_ms: int) -> _Step: ...

    async def correct(
        self, subjects: list[Subject], starts: list[int], delta: int, window_ms: int
    ) -> _Step: ...


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def redis_client(url: str) -> aioredis.Redis:
    """The asyncio Redis client for `url` on the running loop (its connections belong to
    the loop that opened them), with short timeouts: the request path's counters must
    never hold a request up (also routing's health state, llm_proxy.routing.health)."""
    by_url = _clients.setdefault(asyncio.get_running_loop(), {})
    client = by_url.get(url)
    if client is None:
        client = by_url[url] = aioredis.Redis.from_url(
            url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S
        )
    return client


class _RedisBackend:
    """The shared counters: one Lua script per step, so one round trip, atomically.

    redis-py's asyncio client, one per event loop (its connections belong to the loop
    that opened them; a server process has one). Scripts go as EVALSHA, and as EVAL the
    first time a server does not know them.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admit: AsyncScript | None = None
        self._correct: AsyncScript | None = None

    def _scripts(self) -> tuple[AsyncScript, AsyncScript]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._admit is None or self._correct is None:
            client = redis_client(self.url)
            self._admit = client.register_script(_ADMIT_LUA)
            self._correct = client.register_script(_CORRECT_LUA)
            self._loop = loop
        return self._admit, self._correct

    async def admit(self, subjects: list[Subject], tokens: int, window_ms: int) -> _Step:
        args: list[int] = [window_ms, tokens]
        for subject in subjects:
            args += [_or_none(subject.rpm), _or_none(subject.tpm)]
        admit, _ = self._scripts()
        return _step(await admit(keys=[s.key for s in subjects], args=args))

    async def correct(
        self, subjects: list[Subject], starts: list[int], delta: int, window_ms: int
    ) -> _Step:
        _, correct = self._scripts()
        return _step(await correct(keys=[s.key for s in subjects], args=[delta, *starts]))


def _or_none(limit: int | None) -> int:
    return -1 if limit is None else limit


class _MemoryBackend:
    """The same rules in this process's memory: the fallback without Redis.

    Each step runs without awaiting, so on the event loop it is atomic too.
    """

    _PRUNE_AT = 10_000

    def __init__(self) -> None:
        self.windows: dict[str, list[int]] = {}  # key -> [start, requests, tokens]

    @staticmethod
    def _now_ms() -> int:
        return time.monotonic_ns() // 1_000_000

    def _current(self, key: str, now: int, window_ms: int) -> list[int] | None:
        state = self.windows.get(key)
        if state is not None and now >= state[0] + window_ms:
            return None
        return state

    async def admit(self, subjects: list[Subject], tokens: int, window_ms: int) -> _Step:
        now = self._now_ms()
        if len(self.windows) > self._PRUNE_AT:
            self.windows = {
                key: state for key, state in self.windows.items() if now < state[0] + window_ms
            }
        states = [self._current(s.key, now, window_ms) or [now, 0, 0] for s in subjects]
        refused = kind = 0
        for index, (subject, (_, requests, used)) in enumerate(
            zip(subjects, states, strict=True), start=1
        ):
            if subject.rpm is not None and requests >= subject.rpm:
                refused, kind = index, REFUSED_REQUESTS
                break
            if subject.tpm is not None and used >= subject.tpm:
                refused, kind = index, REFUSED_TOKENS
                break
        if not refused:
            for subject, state in zip(subjects, states, strict=True):
                state[1] += 1
                state[2] += tokens
                self.windows[subject.key] = state
        return _Step(refused, kind, now, [(s[0], s[1], s[2]) for s in states])

    async def correct(
        self, subjects: list[Subject], starts: list[int], delta: int, window_ms: int
    ) -> _Step:
        now = self._now_ms()
        out = []
        for subject, start in zip(subjects, starts, strict=True):
            state = self._current(subject.key, now, window_ms)
            if state is not None and state[0] == start:
                state[2] = max(0, state[2] + delta)
            out.append((state[0], state[1], state[2]) if state else (0, 0, 0))
        return _Step(0, 0, now, out)


# --- choosing the backend ------------------------------------------------------------------

_memory = _MemoryBackend()
# A redis.asyncio client belongs to the event loop it connected on (tests run several).
_redis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _RedisBackend]] = (
    weakref.WeakKeyDictionary()
)
_last_failure_log = float("-inf")  # time.monotonic() may be small after a boot


def _backend() -> _Backend:
    url = settings.OTARI_RATELIMIT_REDIS_URL
    if not url:
        return _memory
    by_url = _redis.setdefault(asyncio.get_running_loop(), {})
    backend = by_url.get(url)
    if backend is None:
        backend = by_url[url] = _RedisBackend(url)
    return backend


def warn_if_per_process() -> None:
    """At server startup: say so when limits are only per process."""
    if not settings.OTARI_RATELIMIT_REDIS_URL:
        logger.warning(
            "Rate limits are counted per process: OTARI_RATELIMIT_REDIS_URL is not set "
            "(and CELERY_BROKER_URL is not Redis). With N worker processes or hosts a "
            "caller can make up to N times its rpm/tpm limits."
        )


def _backend_failed(exc: BaseException) -> None:
    global _last_failure_log
    metrics.ratelimit_backend_error_observed()
    now = time.monotonic()
    if now - _last_failure_log >= _FAILURE_LOG_INTERVAL_S:
        _last_failure_log = now
        logger.warning(
            "Rate limits not enforced: Redis is unreachable (%s); requests are let through",
            type(exc).__name__,
        )


_BACKEND_ERRORS = (RedisError, OSError)


# --- the request path ----------------------------------------------------------------------


def _subjects(caller: Caller) -> list[Subject]:
    # Both keys share the user id as their Redis Cluster hash tag, so the script that
    # touches both runs on one node.
    base = f"{settings.OTARI_RATELIMIT_KEY_PREFIX}{{{caller.user_id}}}"
    subjects = []
    if caller.user_rpm_limit is not None or caller.user_tpm_limit is not None:
        subjects.append(Subject("user", f"{base}:u", caller.user_rpm_limit, caller.user_tpm_limit))
    if caller.api_key_id is not None and (
        caller.key_rpm_limit is not None or caller.key_tpm_limit is not None
    ):
        subjects.append(
            Subject(
                "key", f"{base}:k:{caller.api_key_id}", caller.key_rpm_limit, caller.key_tpm_limit
            )
        )
    return subjects


def _windows(subjects: list[Subject], step: _Step, window_ms: int) -> list[Window]:
    return [
        Window(
            subject=subject,
            start_ms=start,
            requests=requests,
            tokens=tokens,
            reset_ms=max(0, start + window_ms - step.now_ms) if start else window_ms,
        )
        for subject, (start, requests, tokens) in zip(subjects, step.states, strict=True)
    ]


async def rate_admit(*, caller: Caller, tokens: int) -> RateAdmission | None:
    """Count the request against the caller's limits, or raise RateLimitExceeded.

    None when the caller has no limits (no round trip at all) or Redis is down.
    """
    if not caller.has_rate_limits:
        return None
    subjects = _subjects(caller)
    window_ms = settings.OTARI_RATELIMIT_WINDOW_SECONDS * 1000
    try:
        step = await _backend().admit(subjects, tokens, window_ms)
    except _BACKEND_ERRORS as exc:
        _backend_failed(exc)
        return None
    windows = _windows(subjects, step, window_ms)
    if step.refused:
        limit = "rpm" if step.kind == REFUSED_REQUESTS else "tpm"
        raise RateLimitExceeded(window=windows[step.refused - 1], limit=limit, windows=windows)
    return RateAdmission(windows=windows, tokens=tokens)


async def rate_settle(admission: RateAdmission | None, *, tokens: int) -> None:
    """Correct the request's counted tokens to `tokens`, what it really used."""
    if admission is None or tokens == admission.tokens:
        return
    delta = tokens - admission.tokens
    subjects = [window.subject for window in admission.windows]
    window_ms = settings.OTARI_RATELIMIT_WINDOW_SECONDS * 1000
    try:
        step = await _backend().correct(
            subjects, [window.start_ms for window in admission.windows], delta, window_ms
        )
    except _BACKEND_ERRORS as exc:
        _backend_failed(exc)
        return
    admission.tokens = tokens
    admission.windows = _windows(subjects, step, window_ms)


def rate_headers(
    windows: list[Window], *, refused: Window | None = None, refused_limit: str | None = None
) -> dict[str, str]:
    """`X-RateLimit-*` for a response.

    `-Requests` and `-Tokens` describe the tightest request and token limit that
    applies (the one with the least remaining). The plain `X-RateLimit-Limit/Remaining/
    Reset` describe the limit that refused the request, else the tightest request
    limit, else the tightest token limit. Reset is in seconds from now.
    """
    headers: dict[str, str] = {}
    plain: tuple[int, int, int] | None = None
    for limit, suffix in (("rpm", "Requests"), ("tpm", "Tokens")):
        candidates = [
            (
                w.subject.rpm if limit == "rpm" else w.subject.tpm,
                w.requests if limit == "rpm" else w.tokens,
                w,
            )
            for w in windows
            if (w.subject.rpm if limit == "rpm" else w.subject.tpm) is not None
        ]
        if not candidates:
            continue
        cap, used, window = min(candidates, key=lambda c: c[0] - c[1])
        values = (cap, max(0, cap - used), math.ceil(window.reset_ms / 1000))
        headers[f"X-RateLimit-Limit-{suffix}"] = str(values[0])
        headers[f"X-RateLimit-Remaining-{suffix}"] = str(values[1])
        headers[f"X-RateLimit-Reset-{suffix}"] = str(values[2])
        if plain is None:
            plain = values
    if refused is not None:
        cap = refused.subject.rpm if refused_limit == "rpm" else refused.subject.tpm
        used = refused.requests if refused_limit == "rpm" else refused.tokens
        plain = (cap or 0, max(0, (cap or 0) - used), math.ceil(refused.reset_ms / 1000))
    if plain is not None:
        headers["X-RateLimit-Limit"] = str(plain[0])
        headers["X-RateLimit-Remaining"] = str(plain[1])
        headers["X-RateLimit-Reset"] = str(plain[2])
    return headers
