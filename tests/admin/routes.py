"""Every URL of the console, from the admin site's own URLconf: the attack tests
(tests/test_authorization.py) and the secret sweep (tests/test_secrets.py) walk them all,
so a page or custom view added later is covered without anyone naming it.

A route's arguments are filled in from the database: `object_id` with a row of the
page's model (a route whose model has no row is left out), `app_label` with each app,
the typed-in filters' `kind` with each kind, and a routing policy's plan page with each
policy. A route this module cannot fill fails the walk, so a new kind of argument is
noticed instead of skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.db import models
from django.urls import URLPattern, URLResolver, reverse

# Pages anyone may open without logging in: the login form, the logout page, the
# JavaScript translations. Every other route needs a staff session.
PUBLIC = {"login", "logout", "jsi18n"}
# view_on_site: a redirect to the object's own site, which no console model has.
_SKIPPED = {"view_on_site"}


@dataclass(frozen=True)
class ConsoleRoute:
    name: str  # the URL name, without "admin:"
    url: str
    model: type[models.Model] | None  # the model whose ModelAdmin serves it

    @property
    def public(self) -> bool:
        return self.name in PUBLIC


def _patterns(patterns: list) -> list[URLPattern]:
    """The URL patterns under `patterns`, includes (each ModelAdmin's) walked."""
    found = []
    for entry in patterns:
        if isinstance(entry, URLResolver):
            found += _patterns(entry.url_patterns)
        else:
            found.append(entry)
    return found


def _model_of(name: str) -> type[models.Model] | None:
    for model in admin.site._registry:
        prefix = f"{model._meta.app_label}_{model._meta.model_name}_"
        if name.startswith(prefix):
            return model
    return None


def _argument_sets(pattern: URLPattern, name: str) -> list[dict[str, str]] | None:
    """The arguments to reverse `name` with (one dict per URL); None: nothing to fill."""
    from budgets.admin_site import SUGGESTION_SOURCES
    from llm_proxy import selectors

    regex = pattern.pattern.regex
    names = list(regex.groupindex)
    if not names:
        return [{}]
    if names == ["app_label"]:
        labels = sorted({m._meta.app_label for m in admin.site._registry})
        return [{"app_label": label} for label in labels]
    if names == ["kind"]:
        return [{"kind": kind} for kind in SUGGESTION_SOURCES]
    if names == ["source", "name"]:
        return [{"source": e.source, "name": e.name} for e in selectors.policy_list()] or None
    if names in (["object_id"], ["id"]):  # a row's page ("id": a user's password form)
        model = _model_of(name)
        assert model is not None, f"no model for the console route {name}"
        row = model._default_manager.order_by("pk").first()
        return None if row is None else [{names[0]: quote(row.pk)}]
    raise AssertionError(f"the console route {name} takes arguments {names} this walk cannot fill")


def console_routes() -> list[ConsoleRoute]:
    """Every named console route, with its arguments filled in (see the module's doc)."""
    routes = []
    for pattern in _patterns(admin.site.get_urls()):
        if pattern.name is None or pattern.name in _SKIPPED:
            continue  # the catch-all that redirects unknown URLs to the login page
        for kwargs in _argument_sets(pattern, pattern.name) or []:
            url = reverse(f"admin:{pattern.name}", kwargs=kwargs)
            routes.append(ConsoleRoute(pattern.name, url, _model_of(pattern.name)))
    return routes
