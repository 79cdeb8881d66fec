"""The console's login throttle: too many failed logins for a username, or from a client
address, and further attempts are refused for a cooldown without the password being
checked (docs/ADMIN.md, "Login throttle").

- Each failed login adds one to two counters, the username's and the address's. A counter
  lives for OTARI_LOGIN_FAILURE_WINDOW_SECONDS from its first failure (a fixed window).
- The failure that brings a counter to OTARI_LOGIN_FAILURE_LIMIT locks that username or
  address for OTARI_LOGIN_LOCKOUT_SECONDS, and clears the counter: after the cooldown it
  gets the full count again.
- A successful login clears its username's counter (not the address's: one right password
  does not excuse a guessing address).
- Every failed or refused login logs one line (logger `otari.login`): the username as
  `repr` (escaped, bounded), the client address and the count; never the password.

The counters are in Django's default cache (otari/settings.py `CACHES`): Redis when one is
configured, so every worker process and host shares them, else the process's memory (one
process's count, reset on restart). The cache's own expiry ends windows and lockouts. If
the cache cannot be reached the throttle lets logins through, with one warning line each:
an outage of Redis must not lock every operator out of the console.

The client address is REMOTE_ADDR: behind a reverse proxy, run uvicorn with
`--proxy-headers --forwarded-allow-ips=<the proxy>` so that it is the client's, not the
proxy's (otherwise every client shares one address counter).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpRequest

logger = logging.getLogger("otari.login")

_PREFIX = "login-throttle"
# Usernames are the client's text: bounded in the log line.
_MAX_LOGGED_USERNAME = 150

THROTTLED_MESSAGE = (
    "Too many failed login attempts for this username or from this address. "
    "Try again in %(minutes)d minute(s)."
)


def client_address(request: HttpRequest | None) -> str:
    return (request.META.get("REMOTE_ADDR") if request is not None else None) or "unknown"


def _keys(kind: str, value: str) -> tuple[str, str]:
    # Hashed: a username is arbitrary text, and cache keys have length and character
    # limits. Case-folded, so that "Admin" and "admin" share a count.
    digest = hashlib.sha256(value.casefold().encode("utf-8", "surrogatepass")).hexdigest()
    return f"{_PREFIX}:{kind}:fails:{digest}", f"{_PREFIX}:{kind}:locked:{digest}"


def _subjects(username: str, address: str) -> list[tuple[str, str]]:
    return [("user", username), ("addr", address)]


def _logged(username: str) -> str:
    return repr(username[:_MAX_LOGGED_USERNAME])


def locked_for_seconds(username: str, address: str) -> float:
    """How long until attempts for `username` from `address` are allowed again; 0 when
    they are now."""
    now = time.time()
    try:
        until = cache.get_many(
            [_keys(kind, value)[1] for kind, value in _subjects(username, address)]
        )
    except Exception:
        logger.warning("Login throttle: the cache is unreachable; not throttling")
        return 0.0
    return max([until_ts - now for until_ts in until.values()] + [0.0])


def failure_record(username: str, address: str) -> None:
    """A failed login: count it for the username and the address, lock either that
    reaches the limit, and log one line."""
    limit = settings.OTARI_LOGIN_FAILURE_LIMIT
    counts = []
    locked = []
    try:
        for kind, value in _subjects(username, address):
            fails_key, locked_key = _keys(kind, value)
            cache.add(fails_key, 0, timeout=settings.OTARI_LOGIN_FAILURE_WINDOW_SECONDS)
            try:
                count = cache.incr(fails_key)
            except ValueError:  # expired between add and incr
                cache.set(fails_key, 1, timeout=settings.OTARI_LOGIN_FAILURE_WINDOW_SECONDS)
                count = 1
            if count >= limit:
                lockout = settings.OTARI_LOGIN_LOCKOUT_SECONDS
                cache.set(locked_key, time.time() + lockout, timeout=lockout)
                cache.delete(fails_key)
                locked.append(kind)
            counts.append(count)
    except Exception:
        logger.warning("Login throttle: the cache is unreachable; failure not counted")
    logger.warning(
        "Failed console login for username %s from %s (%s of %d failures)%s",
        _logged(username),
        address,
        "/".join(str(count) for count in counts) or "?",
        limit,
        f"; locked out for {settings.OTARI_LOGIN_LOCKOUT_SECONDS} s ({' and '.join(locked)})"
        if locked
        else "",
    )


def success_record(username: str) -> None:
    """A successful login: the username's failures are forgiven."""
    try:
        cache.delete(_keys("user", username)[0])
    except Exception:
        logger.warning("Login throttle: the cache is unreachable; count not reset")


class ThrottledAdminAuthenticationForm(AdminAuthenticationForm):
    """The console's login form, throttled (the module docstring has the policy)."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": THROTTLED_MESSAGE,
    }

    def clean(self) -> dict:
        username = self.cleaned_data.get("username") or ""
        password = self.cleaned_data.get("password")
        if not (username and password):
            return super().clean()  # nothing was tried: the required-field errors
        address = client_address(self.request)
        wait = locked_for_seconds(username, address)
        if wait > 0:
            logger.warning(
                "Refused console login for username %s from %s: throttled for %d more s",
                _logged(username),
                address,
                math.ceil(wait),
            )
            raise ValidationError(
                self.error_messages["throttled"],
                code="throttled",
                params={"minutes": max(1, math.ceil(wait / 60))},
            )
        try:
            cleaned = super().clean()
        except ValidationError:
            failure_record(username, address)
            raise
        success_record(username)
        return cleaned
