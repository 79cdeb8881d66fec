"""No secret leaves the gateway (docs/RELIABILITY.md, "Secrets"): a session with
recognisable secrets (provider keys, `gw-` keys, the master key, the platform's tokens,
the metrics token, the console password, Django's secret key), with successful requests,
failing providers that echo the credential they were sent, bad keys, the management API,
every console page and /metrics, through two gateway processes (text and JSON logs, at
DEBUG with payload logging on). Then every response (headers and body), everything the
processes wrote, every usage row and a full `pg_dump` of the database are searched for
each secret and for every 12-character piece of it.

The only responses allowed to hold a secret are the ones that issue it, once (a key made
or rotated through the API or the console), and each holds only its own.
"""

from __future__ import annotations

import glob
import hashlib
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from django.db import connections

from budgets.models import APIKey, MasterKey
from budgets.services.keys import secret_hash
from tests.admin.routes import console_routes
from tests.conftest import start_server_process
from tests.drills import record
from tests.factories import (
    make_budget,
    make_ceiling,
    make_key,
    make_user,
    make_workspace,
    set_price,
)
from tests.fake_platform import FakePlatform, attempt
from tests.fake_provider import SECRET_IN_ERRORS
from usage.models import UsageLog

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# A piece of a secret this long found anywhere counts as a leak (the console shows a
# key's first 7 and last 4 characters after `gw-`, by design).
PIECE = 12
PG_DUMP = ([shutil.which("pg_dump")] if shutil.which("pg_dump") else []) + sorted(
    glob.glob("/usr/lib/postgresql/*/bin/pg_dump")
)


def _made(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(30)


@dataclass
class Secrets:
    """name -> (value, length of its non-secret prefix)."""

    values: dict[str, tuple[str, int]] = field(default_factory=dict)

    def add(self, name: str, value: str, prefix_len: int) -> str:
        self.values[name] = (value, prefix_len)
        return value

    def add_key(self, name: str, value: str) -> str:
        assert value.startswith("gw-")
        return self.add(name, value, 3)

    def needles(self) -> list[tuple[str, str]]:
        """(secret name, text): each secret whole and every PIECE-long run of its secret
        part."""
        found = []
        for name, (value, prefix_len) in self.values.items():
            found.append((name, value))
            part = value[prefix_len:]
            found += [(name, part[i : i + PIECE]) for i in range(len(part) - PIECE + 1)]
        return found


@dataclass
class Seen:
    """Everything the session got back, and which response may hold which secret."""

    responses: list[tuple[str, str]] = field(default_factory=list)  # (label, text)
    issuing: dict[int, str] = field(default_factory=dict)  # response index -> secret name

    def add(self, response: httpx.Response, *, issues: str | None = None) -> httpx.Response:
        request = response.request
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        label = f"{request.method} {request.url} -> {response.status_code}"
        if issues is not None:
            self.issuing[len(self.responses)] = issues
        self.responses.append((label, f"{headers}\n\n{response.text}"))
        return response


def _config(path: Path, fake_url: str, root_url: str, openai_key: str, anthropic_key: str) -> Path:
    path.write_text(
        f"""
providers:
  openai: {{kind: openai, api_key: "{openai_key}", api_base: "{fake_url}", timeout: 5}}
  anthropic: {{kind: anthropic, api_key: "{anthropic_key}", api_base: "{root_url}", timeout: 5}}
  dead: {{kind: openai, api_key: "{openai_key}", api_base: "http://127.0.0.1:9/v1"}}
"""
    )
    return path


CHAT = [{"role": "user", "content": "Say hello to the test suite"}]
FAILURES = (
    "fail-400",  # the fake's message names a key and an internal URL
    "fail-401",
    "fail-429",
    "fail-500",
    "fail-midstream",
    "fail-401-echokey",  # echoes the gateway's provider credential, in full
    "fail-400-echokey",
    "fail-502-echokey-plain",
)


def _generation(client: httpx.Client, seen: Seen, key: str, header: str) -> None:
    """Successes and failures on every generation endpoint, with `key` in `header`."""
    value = f"Bearer {key}" if header == "Authorization" else key
    auth = {header: value}
    post = lambda path, body: seen.add(client.post(path, json=body, headers=auth))  # noqa: E731
    for stream in (False, True):
        post(
            "/v1/chat/completions",
            {"model": "openai:gpt-4o-mini", "messages": CHAT, "stream": stream},
        )
        post(
            "/v1/messages",
            {
                "model": "anthropic:claude-3-5-haiku-latest",
                "max_tokens": 32,
                "messages": CHAT,
                "stream": stream,
            },
        )
        post("/v1/responses", {"model": "openai:gpt-4o-mini", "input": "hello", "stream": stream})
        for failure in FAILURES:
            post(
                "/v1/chat/completions",
                {"model": f"openai:gpt-4o-mini-{failure}", "messages": CHAT, "stream": stream},
            )
            post(
                "/v1/messages",
                {
                    "model": f"anthropic:claude-3-5-haiku-latest-{failure}",
                    "max_tokens": 32,
                    "messages": CHAT,
                    "stream": stream,
                },
            )
        # 200 streams whose first event, or a later one, is the provider's error,
        # echoing the key.
        for echo in ("echokey-errorfirst", "echokey-latefail"):
            post(
                "/v1/responses",
                {"model": f"openai:gpt-4o-mini-{echo}", "input": "hello", "stream": True},
            )
            post(
                "/v1/chat/completions",
                {"model": f"openai:gpt-4o-mini-{echo}", "messages": CHAT, "stream": True},
            )
            post(
                "/v1/messages",
                {
                    "model": f"anthropic:claude-3-5-haiku-latest-{echo}",
                    "max_tokens": 32,
                    "messages": CHAT,
                    "stream": True,
                },
            )
    post("/v1/chat/completions", {"model": "dead:gpt-4o-mini", "messages": CHAT})
    post("/v1/embeddings", {"model": "openai:text-embedding-3-small", "input": "hello"})
    post(
        "/v1/messages/count_tokens",
        {"model": "anthropic:claude-3-5-haiku-latest", "messages": CHAT},
    )
    seen.add(client.get("/v1/models", headers=auth))


def _price_everything() -> None:
    for base in ("openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest"):
        set_price(base)
        for failure in (*FAILURES, "echokey-errorfirst", "echokey-latefail"):
            set_price(f"{base}-{failure}")
    set_price("dead:gpt-4o-mini")
    set_price("openai:text-embedding-3-small", "0.02", "0")


def _console_login(client: httpx.Client, username: str, password: str) -> None:
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    done = client.post(
        "/admin/login/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": token,
            "next": "/admin/",
        },
    )
    assert done.status_code == 302, done.text[:500]


def _csrf(client: httpx.Client, url: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get(url).text).group(1)


def _session(server_url: str, seen: Seen, known: Secrets, s: dict[str, str], tag: str) -> None:
    master = {"Authorization": f"Bearer {s['master']}"}
    with httpx.Client(base_url=server_url, timeout=30) as client:
        # Keys: made by a service, through the API (the response shows it once), rotated.
        user = make_user(user_id=f"sweep-{tag}", budget=make_budget(max_budget_usd=100))
        _, service_key = make_key(user, key_name="service")
        known.add_key(f"service key {tag}", service_key)
        created = client.post(
            "/v1/keys", json={"user_id": user.pk, "key_name": "api"}, headers=master
        )
        api_key = known.add_key(f"api key {tag}", created.json()["key"])
        seen.add(created, issues=f"api key {tag}")
        rotated = client.post(f"/v1/keys/{created.json()['id']}/rotate", headers=master)
        rotated_key = known.add_key(f"api key rotated {tag}", rotated.json()["key"])
        seen.add(rotated, issues=f"api key rotated {tag}")
        revoked_key_row, revoked_key = make_key(user, key_name="revoked")
        known.add_key(f"revoked key {tag}", revoked_key)
        seen.add(client.delete(f"/v1/keys/{revoked_key_row.pk}", headers=master))

        for key, header in ((service_key, "Authorization"), (rotated_key, "x-api-key")):
            _generation(client, seen, key, header)
        # The master key bills the user the request names.
        seen.add(
            client.post(
                "/v1/chat/completions",
                json={"model": "openai:gpt-4o-mini", "messages": CHAT, "user": user.pk},
                headers=master,
            )
        )
        # A platform user's token: resolved by the platform, which hands out its own
        # provider key; once on a provider that echoes it back.
        platform_auth = {"Authorization": f"Bearer {s['platform user token']}"}
        for model in ("gpt-4o-mini", "gpt-4o-mini-fail-401-echokey", "gpt-4o-mini-fail-500"):
            s["platform"].attempts = [
                attempt(
                    "att",
                    "openai",
                    model,
                    api_base=s["fake url"],
                    api_key=s["platform provider key"],
                )
            ]
            seen.add(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "openai:gpt-4o-mini", "messages": CHAT},
                    headers=platform_auth,
                )
            )

        # Bad credentials, each of them a secret or close to one.
        for bad in (
            api_key,  # rotated away
            revoked_key,
            service_key + "x",
            service_key[:-1],
            s["openai provider key"],  # a client presenting the provider's own key
            s["master"] + "x",
        ):
            seen.add(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "openai:gpt-4o-mini", "messages": CHAT},
                    headers={"Authorization": f"Bearer {bad}"},
                )
            )
            seen.add(client.get("/v1/users", headers={"Authorization": f"Bearer {bad}"}))
            seen.add(client.get("/admin/", headers={"Authorization": f"Bearer {bad}"}))
        seen.add(client.get("/v1/users", headers={"x-api-key": service_key}))

        # The management API, read and written with the master key.
        for path in (
            "/v1/users",
            f"/v1/users/{user.pk}",
            f"/v1/users/{user.pk}/usage",
            "/v1/keys",
            f"/v1/keys/{created.json()['id']}",
            "/v1/usage",
            "/v1/usage/count",
            "/v1/usage/summary",
            "/v1/usage/summary.csv",
            "/v1/pricing",
            "/v1/budgets",
            "/v1/workspaces",
            "/v1/scoped-budgets",
            "/v1/aliases",
            "/v1/routing/policies",
            "/openapi.json",
            "/health",
            "/health/readiness",
        ):
            seen.add(client.get(path, headers=master))
        seen.add(client.post(f"/v1/users/{user.pk}/topup", json={"amount": 5}, headers=master))

        # /metrics, with its token.
        metrics = seen.add(
            client.get("/metrics", headers={"Authorization": f"Bearer {s['metrics token']}"})
        )
        assert metrics.status_code == 200
        assert 'status="502"' in metrics.text  # the session's traffic, failures included

    # The console, logged in over HTTP: a key made and one rotated there, then every page.
    with httpx.Client(base_url=server_url, timeout=30) as console:
        _console_login(console, s["console user"], s["console password"])
        add_url = "/admin/budgets/apikey/add/"
        made = console.post(
            add_url,
            data={
                "user": user.pk,
                "key_name": "console",
                "allowed_models": "null",
                "metadata": "{}",
                "csrfmiddlewaretoken": _csrf(console, add_url),
            },
        )
        console_key = known.add_key(
            f"console key {tag}", re.search(r"gw-[A-Za-z0-9_\-]{40,}", made.text).group(0)
        )
        seen.add(made, issues=f"console key {tag}")
        console_row = APIKey.objects.get(key_hash=secret_hash(console_key))
        changelist = "/admin/budgets/apikey/"
        turned = console.post(
            changelist,
            data={
                "action": "rotate_keys",
                "_selected_action": [str(console_row.pk)],
                "csrfmiddlewaretoken": _csrf(console, changelist),
            },
        )
        console_rotated = known.add_key(
            f"console key rotated {tag}", re.search(r"gw-[A-Za-z0-9_\-]{40,}", turned.text).group(0)
        )
        seen.add(turned, issues=f"console key rotated {tag}")
        with httpx.Client(base_url=server_url, timeout=30) as client:
            _generation(client, seen, console_rotated, "Otari-Key")
        for route in console_routes():
            seen.add(console.get(route.url))


def test_no_secret_appears_in_any_response_log_row_page_metric_or_dump(
    gateway, fake_provider, tmp_path, django_user_model
):
    known = Secrets()
    s: dict = {}
    s["openai provider key"] = known.add("openai provider key", _made("prov-"), 5)
    s["anthropic provider key"] = known.add("anthropic provider key", _made("sk-ant-api03-"), 13)
    s["master"] = known.add("master key", _made("mk-"), 3)
    s["metrics token"] = known.add("metrics token", _made("mt-"), 3)
    s["platform token"] = known.add("platform token", _made("pt-"), 3)
    s["platform user token"] = known.add("platform user token", _made("put-"), 4)
    s["platform provider key"] = known.add("platform provider key", _made("pmk-"), 4)
    s["console password"] = known.add("console password", _made("pw-"), 3)
    django_key = known.add("Django secret key", _made("dj-"), 3)
    s["console user"] = "sweep-admin"
    s["fake url"] = fake_provider.base_url
    django_user_model.objects.create_superuser(s["console user"], "", s["console password"])
    _price_everything()
    workspace = make_workspace("sweep")
    make_ceiling(workspace, make_budget(max_budget_usd=1000))
    config = _config(
        tmp_path / "otari.yaml",
        fake_provider.base_url,
        fake_provider.root_url,
        s["openai provider key"],
        s["anthropic provider key"],
    )

    seen = Seen()
    logs = []
    with FakePlatform(token=s["platform token"]) as platform:
        platform.users[s["platform user token"]] = "platform-user"
        platform.fresh_ids = True
        s["platform"] = platform
        for log_format in ("text", "json"):
            log_path = tmp_path / f"gateway-{log_format}.log"
            metrics_dir = tmp_path / f"metrics-{log_format}"
            metrics_dir.mkdir()
            server = start_server_process(
                config,
                log_path=log_path,
                stdout_too=True,
                OTARI_LOG_FORMAT=log_format,
                OTARI_LOG_LEVEL="DEBUG",
                OTARI_LOG_PAYLOADS="true",
                OTARI_MASTER_KEY=s["master"],
                OTARI_ENABLE_METRICS="true",
                OTARI_METRICS_TOKEN=s["metrics token"],
                OTARI_PLATFORM_URL=platform.url,
                OTARI_PLATFORM_TOKEN=s["platform token"],
                DJANGO_SECRET_KEY=django_key,
                # As production runs several workers (docs/OBSERVABILITY.md).
                PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            )
            try:
                _session(server.url, seen, known, s, log_format)
            finally:
                server.process.terminate()
                server.process.wait(timeout=15)
            logs.append((f"{log_format} log", log_path.read_text(errors="replace")))
        resolves = len(platform.resolves)

    # The provider credentials were really in play: the fake was sent them.
    presented = {
        r.headers.get("authorization") or r.headers.get("x-api-key") for r in fake_provider.requests
    }
    assert f"Bearer {s['openai provider key']}" in presented
    assert s["anthropic provider key"] in presented
    assert f"Bearer {s['platform provider key']}" in presented
    assert resolves >= 6
    # ... and were echoed back to the gateway, by every kind of echo.
    echoed = {
        r.model.split("echokey", 1)[1]
        for r in fake_provider.requests
        if "echokey" in (r.model or "")
    }
    assert {"", "-plain", "-errorfirst", "-latefail"} <= echoed, echoed
    statuses = [label.rsplit(" ", 1)[1] for label, _ in seen.responses]
    assert {"200", "400", "401", "403", "429", "502"} <= set(statuses), sorted(set(statuses))
    # Both processes logged every request (the access lines), in their format.
    assert logs[0][1].count(" INFO otari.access ") >= len(seen.responses) // 2
    assert logs[1][1].count('"logger": "otari.access"') >= len(seen.responses) // 2

    # Keys are stored hashed: the row of each key still in use holds the SHA-256 of its
    # secret, and the secret itself is nowhere in the dump (the scan below).
    for name, (value, _) in known.values.items():
        if name.startswith(("service key", "api key rotated", "console key rotated")):
            assert APIKey.objects.filter(key_hash=secret_hash(value)).exists(), name
    assert not MasterKey.objects.exists()  # the master key is configured, never stored

    usage_rows = list(UsageLog.objects.values())
    dump = _pg_dump()
    corpora = [
        *seen.responses,
        *logs,
        ("usage rows", "\n".join(repr(row) for row in usage_rows)),
        ("database dump", dump),
    ]
    needles = known.needles()
    leaks = []
    reported = set()
    for index, (label, text) in enumerate(corpora):
        allowed = seen.issuing.get(index) if index < len(seen.responses) else None
        if allowed is not None:
            # An issuing response shows its own new secret, whole, and nothing else.
            assert known.values[allowed][0] in text, label
        for name, needle in needles:
            if name != allowed and needle in text and (name, label) not in reported:
                reported.add((name, label))
                at = text.index(needle)
                leaks.append((name, label, text[max(0, at - 80) : at + 80]))
    assert not leaks, "\n".join(
        f"{name} in {label}: ...{context}..." for name, label, context in leaks[:20]
    )
    # The fake's own fake key, quoted in its 400s, is redacted too.
    assert not any(SECRET_IN_ERRORS in text for _, text in corpora)

    record(
        "secrets",
        secrets=len(known.values),
        needles=len(needles),
        responses=len(seen.responses),
        console_pages=sum("/admin/" in label for label, _ in seen.responses),
        log_lines=sum(text.count("\n") for _, text in logs),
        usage_rows=len(usage_rows),
        dump_bytes=len(dump),
        leaks=len(leaks),
    )


def _pg_dump() -> str:
    """A full dump (schema and data) of the test database, as the operator's backup holds it."""
    assert PG_DUMP, "pg_dump is not installed"
    db = connections["default"].settings_dict
    command = [
        PG_DUMP[-1] if len(PG_DUMP) > 1 else PG_DUMP[0],
        "-h",
        db.get("HOST") or "127.0.0.1",
        "-p",
        str(db.get("PORT") or 5432),
        "-U",
        db.get("USER") or "postgres",
        db["NAME"],
    ]
    env = {"PGPASSWORD": db.get("PASSWORD") or ""}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "COPY public.usage_usagelog" in done.stdout or "usagelog" in done.stdout
    return done.stdout


def test_credentials_are_compared_by_hash_lookup_or_in_constant_time(
    gateway, settings, monkeypatch
):
    """A `gw-` key is looked up by its SHA-256 (an index lookup: its timing says nothing
    about the secret, and the secret itself is never in the query); the master key and
    the metrics token, which are configured, go through hmac.compare_digest. Asserted on
    the code path, through HTTP: timing itself is not measurable in a test."""
    import hmac

    from budgets import selectors

    compared: list[tuple[bytes | str, bytes | str]] = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    looked_up: list[dict] = []
    real_load = selectors.caller_load

    async def load_spy(**kwargs):
        looked_up.append(kwargs)
        return await real_load(**kwargs)

    monkeypatch.setattr("llm_proxy.auth.caller_load", load_spy)
    settings.OTARI_MASTER_KEY = "otari-mk-compare-test"
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_TOKEN = "metrics-compare-token"
    set_price()
    _, secret = make_key(make_user())

    with gateway.client() as client:
        ok = client.post(
            "/v1/chat/completions",
            json={"model": "openai:gpt-4o-mini", "messages": CHAT},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert ok.status_code == 200
        assert looked_up
        assert looked_up[0]["key_hash"] == secret_hash(secret)
        assert all(secret not in repr(call) for call in looked_up)
        assert not compared  # no comparison of the secret itself

        assert (
            client.get("/v1/users", headers={"Authorization": "Bearer otari-mk-wrong"}).status_code
            == 401
        )
        assert (b"otari-mk-wrong", b"otari-mk-compare-test") in compared
        compared.clear()
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code in (
            401,
            403,
        )
        assert (b"nope", b"metrics-compare-token") in compared
    # Only hashes are stored: the key's row holds its SHA-256, never the secret.
    assert (
        APIKey.objects.get(key_hash=secret_hash(secret)).key_hash
        == hashlib.sha256(secret.encode()).hexdigest()
    )
