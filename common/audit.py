"""Who is changing money settings right now, and through what: the console, the
management API, a command, or the gateway itself (common/history.py records it).

Kept free of models so that manage.py can set it before Django starts.
"""

from __future__ import annotations

import contextvars
import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.db import models
from django.http import HttpRequest, HttpResponse


class Channel(models.TextChoices):
    CONSOLE = "console", "console"
    API = "api", "management API"
    COMMAND = "command", "command"
    SYSTEM = "system", "gateway"


@dataclass(frozen=True)
class Actor:
    channel: str
    label: str
    # The console's request: its logged-in user is read when a change is recorded.
    request: HttpRequest | None = None

    def who(self) -> str:
        if self.request is not None:
            user = getattr(self.request, "user", None)
            if user == "master":  # the management API's master-key principal
                return "master key"
            if user is not None and getattr(user, "is_authenticated", False):
                return user.get_username()
        return self.label


_SYSTEM = Actor(channel=Channel.SYSTEM, label="gateway")
_process_actor: list[Actor] = [_SYSTEM]
_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("otari_actor", default=None)


def current_actor() -> Actor:
    return _actor.get() or _process_actor[0]


@contextmanager
def acting(actor: Actor) -> Iterator[None]:
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def command_actor_set(argv: list[str]) -> None:
    """Changes made by this process are a command's (called by manage.py)."""
    if len(argv) > 1 and argv[1] not in ("runserver", "shell", "test"):
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
        _process_actor[0] = Actor(channel=Channel.COMMAND, label=f"manage.py {argv[1]} ({who})")


class AuditContextMiddleware:
    """Every change made while answering a console or management-API request is recorded
    with its channel and the person or key behind it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from django.urls import reverse

        in_console = request.path.startswith(reverse("admin:index"))
        channel = Channel.CONSOLE if in_console else Channel.API
        with acting(Actor(channel=channel, label=channel.label, request=request)):
            return self.get_response(request)
