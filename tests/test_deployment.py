"""Production deployment as the README describes it (issue 12, item 3), through HTTP into
the running gateway: the allowed-hosts policy, the front page and the API docs."""

from __future__ import annotations

import logging
import time
from io import StringIO

import httpx
import pytest
from django.core.management import CommandError, call_command

from budgets.models import MasterKey
from budgets.services.keys import MASTER_KEY_RECHECK_SECONDS
from tests.conftest import MASTER_KEY, start_server_process
from tests.factories import make_key, make_user, set_price
from usage.models import UsageLog

# A load balancer's or a Kubernetes probe's Host: the pod's address.
POD_HOST = "10.42.0.17:8000"
HEALTH_PATHS = [
    "/health",
    "/health/liveness",
    "/health/readiness",
    "/v1/health",
    "/api/v1/health/readiness",
]
CHAT = {"model": "openai:gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def hosts_log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def _refusal_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "otari.access"]


@pytest.mark.parametrize("path", HEALTH_PATHS)
def test_health_answers_whatever_the_host(gateway, path, hosts_log):
    with gateway.client() as client:
        response = client.get(path, headers={"Host": POD_HOST})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] in ("healthy", "alive", "ready")
    assert _refusal_lines(hosts_log) == []


@pytest.mark.parametrize("path", HEALTH_PATHS)
def test_health_refuses_a_host_that_is_no_host_name_with_json(gateway, path, hosts_log):
    with gateway.client() as client:
        response = client.get(path, headers={"Host": "no such host!"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "DJANGO_ALLOWED_HOSTS" in response.json()["detail"]
    assert [r.name for r in _refusal_lines(hosts_log)] == ["common.hosts"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/users", None),
        ("GET", "/openapi.json", None),
        ("GET", "/", None),
        ("GET", "/metrics", None),
    ],
)
def test_a_refused_host_gets_json_and_one_log_line(gateway, hosts_log, method, path, body):
    with gateway.client(MASTER_KEY) as client:
        response = client.request(method, path, json=body, headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "DJANGO_ALLOWED_HOSTS" in response.json()["detail"]
    assert response.headers["x-otari-request-id"]
    lines = _refusal_lines(hosts_log)
    assert [(r.name, r.exc_info) for r in lines] == [("common.hosts", None)]
    assert "'evil.example'" in lines[0].getMessage()


@pytest.mark.parametrize("path", ["/admin/", "/admin/login/", "/admin"])
def test_the_console_refuses_a_host_with_an_html_page(gateway, hosts_log, path):
    with gateway.client() as client:
        response = client.get(path, headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Bad Request (400)</h1>" in response.text
    assert "DJANGO_ALLOWED_HOSTS" in response.text
    assert "evil.example" not in response.text  # nothing of the request is echoed
    assert [(r.name, r.exc_info) for r in _refusal_lines(hosts_log)] == [("common.hosts", None)]


@pytest.mark.parametrize(
    ("path", "body", "api"),
    [
        ("/v1/chat/completions", CHAT, "openai"),
        ("/api/v1/chat/completions", CHAT, "openai"),
        ("/v1/messages", {**CHAT, "max_tokens": 16}, "anthropic"),
        ("/v1/responses", {"model": "openai:gpt-4o-mini", "input": "Hello"}, "openai"),
        ("/v1/embeddings", {"model": "openai:gpt-4o-mini", "input": "Hello"}, "openai"),
        ("/v1/models", None, "openai"),
    ],
)
def test_generation_routes_follow_the_same_policy(gateway, hosts_log, path, body, api):
    set_price()
    _, secret = make_key(make_user(user_id="hal"))
    with gateway.client(secret) as client:
        method = "POST" if body else "GET"
        response = client.request(method, path, json=body, headers={"Host": "evil.example"})
    assert response.status_code == 400
    payload = response.json()
    if api == "anthropic":
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "invalid_request_error"
    else:
        assert payload["error"]["code"] == "host_not_allowed"
    assert "DJANGO_ALLOWED_HOSTS" in payload["detail"]
    assert gateway.fake.hits == 0
    assert not UsageLog.objects.exists()
    assert [r.name for r in _refusal_lines(hosts_log)] == ["common.hosts"]


def test_api_any_host_opens_the_apis_only(gateway, settings, hosts_log):
    settings.OTARI_API_ANY_HOST = True
    set_price()
    _, secret = make_key(make_user(user_id="ida"))
    with gateway.client(secret) as client:
        answered = client.post("/v1/chat/completions", json=CHAT, headers={"Host": POD_HOST})
        console = client.get("/admin/login/", headers={"Host": POD_HOST})
    assert answered.status_code == 200
    assert console.status_code == 400


def test_listed_hosts_with_a_port_are_served(gateway, settings):
    settings.OTARI_ALLOWED_HOSTS = ["gateway.internal"]
    with gateway.client() as client:
        listed = client.get("/admin/login/", headers={"Host": "gateway.internal:8443"})
        local = client.get("/admin/login/", headers={"Host": "localhost:8000"})
    assert listed.status_code == 200
    assert local.status_code == 400


# --- the front page and the docs ------------------------------------------------------------


def test_a_browser_opening_the_gateway_gets_a_page_of_links(gateway):
    with gateway.client() as client:
        response = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for href in ('href="/admin/"', 'href="/docs"', 'href="/redoc"', 'href="/health"'):
        assert href in response.text
    with gateway.client() as client:
        for link in ("/admin/", "/docs", "/docs/", "/redoc", "/redoc/", "/health"):
            followed = client.get(link, follow_redirects=True)
            assert followed.status_code == 200, link


def test_an_api_client_asking_for_json_gets_json(gateway):
    with gateway.client() as client:
        response = client.get("/", headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.json()["docs"] == "/docs"
    assert response.json()["console"] == "/admin/"


# --- metrics with several worker processes ----------------------------------------------------


def _started_log(gateway_config_file, tmp_path, name: str, **env: str) -> str:
    """The log of a gateway started with `env`, once it answers."""
    log_path = tmp_path / f"{name}.log"
    server = start_server_process(
        gateway_config_file, log_path=log_path, OTARI_ENABLE_METRICS="true", **env
    )
    try:
        # Each worker imports the app on its first request: reach every one of them.
        for _ in range(8):
            httpx.get(server.url + "/health", timeout=10)
    finally:
        server.kill()
    return log_path.read_text()


@pytest.mark.slow
def test_metrics_without_a_multiprocess_dir_warn_with_several_workers(
    gateway, gateway_config_file, tmp_path
):
    several = _started_log(gateway_config_file, tmp_path, "several", WEB_CONCURRENCY="2")
    assert "Metrics are WRONG" in several
    assert "PROMETHEUS_MULTIPROC_DIR" in several
    one = _started_log(gateway_config_file, tmp_path, "one", WEB_CONCURRENCY="1")
    assert "Metrics are WRONG" not in one
    shared = tmp_path / "prometheus"
    shared.mkdir()
    summed = _started_log(
        gateway_config_file,
        tmp_path,
        "summed",
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(shared),
    )
    assert "Metrics are WRONG" not in summed


# --- replacing a lost generated master key ----------------------------------------------------


def _printed_key(output: str) -> str:
    return output.strip().splitlines()[1].strip()


def _users_status(url: str, key: str) -> int:
    return httpx.get(url + "/v1/users", headers={"Authorization": f"Bearer {key}"}).status_code


@pytest.mark.slow
@pytest.mark.postgres  # gateways and the command in their own processes, on the test database
def test_rotate_master_key_replaces_a_generated_key_in_running_gateways(
    gateway, gateway_config_file, settings
):
    settings.OTARI_MASTER_KEY = ""
    out = StringIO()
    call_command("bootstrap", stdout=out)
    old = _printed_key(out.getvalue())
    other = start_server_process(gateway_config_file, OTARI_MASTER_KEY="")
    try:
        assert _users_status(gateway.url, old) == _users_status(other.url, old) == 200
        out = StringIO()
        call_command("rotate_master_key", stdout=out)
        new = _printed_key(out.getvalue())
        assert new.startswith("otari-mk-")
        assert new != old
        assert new not in str(list(MasterKey.objects.values_list("key_hash", flat=True)))
        # This process at once; another one once it reads the stored hash again.
        assert (_users_status(gateway.url, old), _users_status(gateway.url, new)) == (401, 200)
        time.sleep(MASTER_KEY_RECHECK_SECONDS + 0.2)
        assert (_users_status(other.url, old), _users_status(other.url, new)) == (401, 200)
    finally:
        other.kill()


def test_rotate_master_key_refuses_a_configured_key(gateway, settings):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    with pytest.raises(CommandError, match="OTARI_MASTER_KEY"):
        call_command("rotate_master_key", stdout=StringIO())
    assert not MasterKey.objects.exists()


@pytest.mark.slow
def test_metrics_without_a_token_are_said_loudly_at_startup(gateway, gateway_config_file, tmp_path):
    refused = _started_log(gateway_config_file, tmp_path, "refused")
    assert "Metrics are on but every scrape is refused (403)" in refused
    assert "OTARI_METRICS_TOKEN" in refused
    public = _started_log(gateway_config_file, tmp_path, "public", OTARI_METRICS_PUBLIC="true")
    assert "Metrics are PUBLIC" in public
    guarded = _started_log(
        gateway_config_file, tmp_path, "guarded", OTARI_METRICS_TOKEN="scrape-token-1234"
    )
    assert "every scrape is refused" not in guarded
    assert "Metrics are PUBLIC" not in guarded


# --- a worker's startup (otari/startup.py) ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres  # the hot path's pool, opened at startup, is PostgreSQL's
def test_a_worker_warms_up_before_its_first_request(gateway, gateway_config_file, tmp_path):
    """Served with --lifespan on, as the README says, a worker does at startup what its
    first request would otherwise pay for, and then serves that request like any other."""
    user = make_user(user_id="warm")
    _, secret = make_key(user)
    set_price("openai:gpt-4o-mini", "0.15", "0.60")
    log_path = tmp_path / "warm.log"
    server = start_server_process(gateway_config_file, log_path=log_path, lifespan="on")
    try:
        started = log_path.read_text()
        assert "worker ready in" in started
        assert "warm-up step" not in started
        response = httpx.post(
            server.url + "/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )
    finally:
        server.kill()
    assert response.status_code == 200, response.text
    assert UsageLog.objects.get(user=user).status == "success"


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_starts_when_its_warm_up_cannot_reach_the_database(
    gateway, gateway_config_file, tmp_path
):
    """A database that is down at startup is a warm-up step skipped, not a worker that
    never starts: it answers its liveness probe and says what it skipped."""
    log_path = tmp_path / "cold.log"
    server = start_server_process(
        gateway_config_file,
        log_path=log_path,
        lifespan="on",
        probe="/health/liveness",
        DATABASE_URL="postgres://postgres@127.0.0.1:9/otari_nowhere",
        OTARI_DB_TIMEOUT_SECONDS="0.5",
    )
    try:
        live = httpx.get(server.url + "/health/liveness", timeout=10)
    finally:
        server.kill()
    assert live.status_code == 200
    started = log_path.read_text()
    assert "warm-up step database failed; the first requests will do it" in started
    assert "worker ready in" in started
