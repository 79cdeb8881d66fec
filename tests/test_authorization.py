"""Authorization under attack (docs/RELIABILITY.md, "Authorization"), through HTTP into
the gateway. Routes are enumerated, not hand-picked: the management routes from the
URLconf, the console's from the admin site's URLs and the actions each list offers, so
a route added later is attacked too.

- an API key (`gw-`) reaches no management route and no console page;
- a staff member who may only look changes nothing through any console form, action or
  custom view (money settings included), while the same POSTs by a superuser do;
- every console POST without its CSRF token is refused;
- a provider's address comes from the operator's configuration only: nothing in a
  request sends a call anywhere else (no SSRF).

What is already proven elsewhere: the master key alone opens the management API
(tests/budgets/test_api_users_keys.py::test_management_refuses_anything_but_the_master_key),
the model permissions of each console page (tests/admin/test_permissions.py), and the
login throttle (tests/admin/test_login_throttle.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from html.parser import HTMLParser

import httpx
import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.urls import URLPattern, URLResolver, get_resolver

from llm_proxy.routing import store as routing_store
from tests.admin.conftest import open_hold
from tests.admin.routes import console_routes
from tests.drills import record
from tests.factories import (
    make_budget,
    make_ceiling,
    make_key,
    make_user,
    make_workspace,
    set_price,
)
from tests.fake_provider import FakeProvider

PASSWORD = "pw-authorization-1"


# --- the rows every attack aims at ----------------------------------------------------------


@pytest.fixture
def rows(gateway):
    budget = make_budget(name="money", max_budget_usd=Decimal("10"), budget_duration_sec=3600)
    user = make_user(budget=budget, user_id="victim", alias="the victim")
    key, secret = make_key(user, key_name="victim-key")
    workspace = make_workspace("victim-space")
    ceiling = make_ceiling(workspace, make_budget(name="ceiling-money", max_budget_usd=50))
    price = set_price()
    routing_store.alias_create(name="fast", target="openai:gpt-4o-mini")
    routing_store.policy_save(name="sturdy", spec={"select": [{"default": "openai:gpt-4o-mini"}]})
    open_hold(user, "0.5")
    return {
        "budget": budget,
        "user": user,
        "key": key,
        "secret": secret,
        "workspace": workspace,
        "ceiling": ceiling,
        "price": price,
    }


def state() -> dict[str, list[dict]]:
    """Every row of every model the console shows (money settings, keys, holds, history),
    less what a read changes: a login's timestamp."""
    snapshot = {}
    for model in admin.site._registry:
        values = list(model._default_manager.order_by("pk").values())
        for row in values:
            row.pop("last_login", None)
        snapshot[model._meta.label] = values
    return snapshot


# --- an API key on the management API and the console ---------------------------------------


def _management_patterns() -> Iterator[tuple[str, URLPattern]]:
    """(route, pattern) of every management route under /v1/ and /api/v1/ (the generation
    routes and the health probes are not management)."""
    from llm_proxy import urls as generation_urls

    generation = {p.pattern.regex.pattern for p in generation_urls.urlpatterns}
    for top in get_resolver().url_patterns:
        if not isinstance(top, URLResolver) or str(top.pattern) not in ("v1/", "api/v1/"):
            continue
        for entry in top.url_patterns:
            for pattern in entry.url_patterns if isinstance(entry, URLResolver) else [entry]:
                if pattern.pattern.regex.pattern in generation or "health" in str(pattern.pattern):
                    continue
                yield str(top.pattern), pattern


def _value(name: str, path: str, rows: dict) -> str:
    """A real id for the path parameter `name`: a hole would then hand out a real row."""
    if name == "name":
        return "sturdy" if "routing/" in path else "fast"
    return {
        "user_id": rows["user"].pk,
        "key_id": str(rows["key"].pk),
        "budget_id": str(rows["budget"].pk),
        "workspace_id": str(rows["workspace"].pk),
        "ceiling_id": str(rows["ceiling"].pk),
        "model_key": "openai:gpt-4o-mini",
    }[name]


def _fill(route: str, pattern: URLPattern, rows: dict) -> str:
    """The pattern as a path, its parameters filled with real ids."""
    text = str(pattern.pattern).lstrip("^").rstrip("$")
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: _value(m.group(1), text, rows), text)
    text = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: _value(m.group(1), text, rows), text)
    return "/" + route + text


KEY_HEADERS = ("Authorization", "x-api-key", "Otari-Key")


def _as_key(secret: str, header: str) -> dict[str, str]:
    return {header: f"Bearer {secret}" if header == "Authorization" else secret}


def test_an_api_key_reaches_no_management_route(gateway, settings, rows):
    settings.OTARI_MASTER_KEY = master = "otari-mk-authorization-test"
    paths = sorted({_fill(route, p, rows) for route, p in _management_patterns()})
    assert len(paths) >= 50, paths  # 28 routes, under both prefixes
    before = state()
    refused = 0
    with gateway.client() as client:
        # Every management operation the OpenAPI document lists is among them.
        documented = client.get("/openapi.json").json()["paths"]
        management = [
            (template, operations)
            for template, operations in documented.items()
            if any(op.get("security") == [{"MasterKey": []}] for op in operations.values())
        ]
        assert len(management) >= 25, [t for t, _ in management]
        for template, _ in management:
            path = re.sub(r"\{(\w+)\}", lambda m, t=template: _value(m.group(1), t, rows), template)
            assert path in paths, template
        for path in paths:
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                for header in KEY_HEADERS:
                    response = client.request(
                        method, path, json={"amount": 100}, headers=_as_key(rows["secret"], header)
                    )
                    assert response.status_code == 403, (method, path, response.text)
                    assert response.json() == {
                        "detail": "The management API requires the master key"
                    }, (method, path)
                    refused += 1
            # The route is real, and its row too: the master key reads it (405: a route
            # that only writes).
            read = client.get(path, headers={"Authorization": f"Bearer {master}"})
            assert read.status_code in (200, 405), (path, read.text)
    assert state() == before
    assert refused == len(paths) * 5 * len(KEY_HEADERS)
    record("api key on management routes", paths=len(paths), requests=refused, refused=refused)


def test_an_api_key_opens_no_console_page(gateway, rows):
    routes = [r for r in console_routes() if not r.public]
    assert len(routes) >= 60, [r.url for r in routes]
    with gateway.client() as client:
        for route in routes:
            for method in ("GET", "POST"):
                for header in KEY_HEADERS:
                    response = client.request(
                        method, route.url, headers=_as_key(rows["secret"], header)
                    )
                    # The console knows only sessions: an API key is nobody, sent to the
                    # login page (a POST, first refused for its missing CSRF token).
                    if method == "POST" and response.status_code == 403:
                        assert "CSRF" in response.text, route.url
                        continue
                    assert response.status_code == 302, (method, route.url, response.status_code)
                    assert response.headers["Location"].startswith("/admin/login/"), route.url
                    assert "victim" not in response.text
    record("api key on console routes", routes=len(routes), requests=len(routes) * 6)


# --- the console: staff who may only look, and CSRF -----------------------------------------


class _Forms(HTMLParser):
    """The POST forms of a console page, each as its list of (name, value) fields."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self._select: str | None = None
        self._textarea: str | None = None
        self._select_options: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "form" and (a.get("method") or "").lower() == "post":
            self.forms.append({"action": a.get("action") or "", "fields": []})
        if not self.forms:
            return
        fields = self.forms[-1]["fields"]
        if tag == "input" and a.get("name"):
            kind = (a.get("type") or "text").lower()
            if kind in ("submit", "button", "file"):
                return
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            fields.append([a["name"], a.get("value") or ("on" if kind == "checkbox" else "")])
        elif tag == "textarea" and a.get("name"):
            self._textarea = a["name"]
            fields.append([a["name"], ""])
        elif tag == "select" and a.get("name"):
            self._select, self._select_options = a["name"], []
        elif tag == "option" and self._select is not None:
            self._select_options.append(a.get("value") or "")
            if "selected" in a:
                fields.append([self._select, a.get("value") or ""])

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._textarea = None
        if tag == "select":
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._textarea is not None and self.forms:
            self.forms[-1]["fields"][-1][1] += data


# Fields that hold money or limits: each is changed in the POSTed form, so that a form
# the server accepted would change a money setting.
_MONEY_FIELD = re.compile(r"usd|price|per_mtok|amount|limit|duration|topup", re.IGNORECASE)


def _changed(name: str, value: str) -> str:
    # A top-up needs an expiry, in the future (date and time inputs).
    if name.endswith("expires_at_0"):
        return "2099-01-01"
    if name.endswith("expires_at_1"):
        return "00:00:00"
    try:
        return str(Decimal(value or "0") + 7)
    except ArithmeticError:
        return value


def _posts(client: httpx.Client, routes) -> list[tuple[str, list[tuple[str, str]]]]:
    """What a superuser's browser would POST on every console route: each POST form the
    page shows (money fields changed), and on a list each action it offers, applied to
    every row of the list."""
    posts = []
    for route in routes:
        page = client.get(route.url)
        if page.status_code != 200 or "html" not in page.headers.get("content-type", ""):
            continue
        parser = _Forms()
        parser.feed(page.text)
        for form in parser.forms:
            action = form["action"] or route.url
            if "logout" in action:
                continue
            fields = [
                (name, _changed(name, value) if _MONEY_FIELD.search(name) else value)
                for name, value in form["fields"]
            ]
            if route.name.endswith("_changelist"):
                choices = re.findall(
                    r'<option value="([a-z_]+)">',
                    page.text.split('name="action"', 1)[-1].split("</select>", 1)[0],
                )
                selected = re.findall(r'name="_selected_action" value="([^"]+)"', page.text)
                for choice in choices:
                    body = [(n, v) for n, v in fields if n not in ("action", "_selected_action")]
                    body += [
                        ("action", choice),
                        ("index", "0"),
                        *(("_selected_action", s) for s in selected),
                    ]
                    if choice == "delete_selected":
                        body.append(("post", "yes"))
                    posts.append((action, body))
            else:
                posts.append((action, fields))
    return posts


@contextmanager
def _login(gateway, username: str) -> Iterator[httpx.Client]:
    """A console session over HTTP, logged in through the login form."""
    with gateway.client(follow_redirects=False) as client:
        page = client.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        done = client.post(
            "/admin/login/",
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token},
        )
        assert done.status_code == 302, done.text[:300]
        yield client


def _viewer(django_user_model) -> str:
    """A staff member with every view permission and nothing else."""
    user = django_user_model.objects.create_user("viewer", password=PASSWORD, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__startswith="view_"))
    return user.username


def _csrf_token(client: httpx.Client) -> str:
    return client.cookies["csrftoken"]


@pytest.mark.slow
def test_staff_who_may_only_look_change_no_setting_through_any_form_or_action(
    gateway, rows, django_user_model
):
    django_user_model.objects.create_superuser("root", "", PASSWORD)
    routes = [r for r in console_routes() if not r.public]
    with _login(gateway, "root") as root:
        posts = _posts(root, routes)
    actions = {dict(body).get("action") for _, body in posts} - {None}
    # Every list's actions, the custom views' forms and the change forms are in play.
    assert {"reset_period_now", "rotate_keys", "revoke_keys", "block_users"} <= actions, actions
    assert any("reset-period" in url for url, _ in posts)
    assert any("release-stale" in url for url, _ in posts)

    viewer_name = _viewer(django_user_model)
    before = state()
    with _login(gateway, viewer_name) as viewer:
        token = _csrf_token(viewer)
        statuses = set()
        for url, body in posts:
            response = viewer.post(url, data=_form(body, token))
            statuses.add(response.status_code)
            assert response.status_code in (302, 200, 403), (url, response.status_code)
    after = state()
    assert after == before, _difference(before, after)

    # The same change forms, POSTed by a superuser, do change the money settings: the
    # forms the viewer sent were valid ones.
    with _login(gateway, "root") as root:
        token = _csrf_token(root)
        for url, body in posts:
            if url.endswith("/change/"):
                saved = root.post(url, data=_form(body, token))
                # 403: history (ledgers), which nobody may change.
                assert saved.status_code in (302, 403), (url, _errors(saved.text))
    record("view-only staff POSTs", posts=len(posts), statuses=sorted(statuses), rows_changed=0)
    changed = _difference(before, state())
    for label in ("budgets.Budget", "budgets.Ceiling", "budgets.APIKey", "budgets.GatewayUser"):
        assert label in changed, changed


def _errors(html: str) -> list[str]:
    return re.findall(r'class="errorlist[^"]*"[^>]*>(.*?)</ul>', html, re.S)


def _form(pairs: list[tuple[str, str]], token: str | None) -> dict[str, list[str]]:
    """Form fields for httpx (a name may repeat), with the CSRF token when given."""
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        if name != "csrfmiddlewaretoken":
            form.setdefault(name, []).append(value)
    if token is not None:
        form["csrfmiddlewaretoken"] = [token]
    return form


def _difference(before: dict, after: dict) -> dict[str, str]:
    return {
        label: f"{len(rows)} -> {len(after.get(label, []))} rows"
        for label, rows in before.items()
        if after.get(label) != rows
    }


def test_every_console_post_without_its_csrf_token_is_refused(gateway, rows, django_user_model):
    django_user_model.objects.create_superuser("root", "", PASSWORD)
    routes = console_routes()
    with _login(gateway, "root") as root:
        posts = _posts(root, [r for r in routes if not r.public])
        # Every route, whatever its form, and the login and logout forms too.
        posts += [(route.url, []) for route in routes]
        before = state()
        for url, body in posts:
            response = root.post(url, data=_form(body, None))
            assert response.status_code == 403, (url, response.status_code)
            assert "CSRF verification failed" in response.text, url
        # A token from another session is refused as well.
        response = root.post(posts[0][0], data=_form(posts[0][1], "x" * 64))
        assert response.status_code == 403
    assert state() == before
    assert len(posts) >= 100
    record("console POSTs without CSRF token", posts=len(posts) + 1, refused=len(posts) + 1)


# --- provider addresses come from the operator only (SSRF) ----------------------------------


def test_no_request_sends_a_provider_call_anywhere_but_the_configured_address(gateway, rows):
    with FakeProvider() as elsewhere:
        other = elsewhere.base_url
        hostile = [
            {"api_base": other},
            {"base_url": other},
            {"api_base": other, "api_key": "sk-other"},
            {"extra_headers": {"Host": f"127.0.0.1:{elsewhere.port}"}},
            {"extra_body": {"api_base": other}},
            {"provider": {"api_base": other, "name": "openai"}},
            {"metadata": {"api_base": other}},
        ]
        headers = [
            {"X-Forwarded-Host": f"127.0.0.1:{elsewhere.port}"},
            {"X-Otari-Api-Base": other},
            {"Api-Base": other},
            {"Host": f"127.0.0.1:{elsewhere.port}"},
            {"anthropic-beta": f"x, Host: 127.0.0.1:{elsewhere.port}"},
        ]
        models = [
            "openai:gpt-4o-mini",
            f"openai:{other}/gpt-4o-mini",
            f"{other}:gpt-4o-mini",
            f"openai/{other}",
            f"openai:../../..{other}",
        ]
        statuses = []
        with gateway.client(rows["secret"]) as client:
            for extra in hostile:
                for model in models:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": "hi"}],
                        **extra,
                    }
                    statuses.append(client.post("/v1/chat/completions", json=body).status_code)
            for header in headers:
                body = {
                    "model": "openai:gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                }
                statuses.append(
                    client.post("/v1/chat/completions", json=body, headers=header).status_code
                )
                body = {
                    "model": "anthropic:claude-3-5-haiku-latest",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                statuses.append(client.post("/v1/messages", json=body, headers=header).status_code)
        assert elsewhere.hits == 0
        assert elsewhere.requests == []
    assert 200 in statuses
    assert not [s for s in statuses if s >= 500], statuses
    record("SSRF attempts", requests=len(statuses), elsewhere_hits=0, server_errors=0)
    configured = {f"127.0.0.1:{gateway.fake.port}"}
    assert gateway.fake.requests
    for request in gateway.fake.requests:
        assert request.headers["host"] in configured, request.headers["host"]
        assert request.path in ("/v1/chat/completions", "/v1/messages"), request.path
