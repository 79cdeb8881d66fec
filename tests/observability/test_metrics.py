"""`GET /metrics` through HTTP into the ASGI app: what a scrape reports equals what was
sent, with two gateway processes sharing one PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal

import httpx
import pytest
from django.db.models import Sum
from django.utils import timezone

from budgets.services import holds
from tests.conftest import start_server_process
from tests.factories import make_budget, make_key, make_user, priced, set_price
from tests.fake_platform import GATEWAY_TOKEN, FakePlatform, Reply
from tests.fake_provider import prompt_tokens
from tests.observability.conftest import scrape, value
from usage import ledger
from usage.models import UsageLog, UsageReport
from usage.pricing import Rates, TokenUsage, cost_usd
from usage.reporting import AttemptReport
from usage.services import usage_report_deliver

CHAT = "/v1/chat/completions"
PROMPT = "Count the requests of this scripted run"
P = prompt_tokens({"messages": [{"content": PROMPT}]}, "chat")
RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))


@pytest.fixture
def two_metered_gateways(gateway, gateway_config_file, redis_url, tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {
        "OTARI_ENABLE_METRICS": "true",
        "OTARI_METRICS_PUBLIC": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "OTARI_RATELIMIT_REDIS_URL": redis_url,
    }
    servers = [start_server_process(gateway_config_file, **env) for _ in range(2)]
    yield servers
    for server in servers:
        server.kill()


def _scrape_until(url: str, requests: int, timeout: float = 10) -> dict:
    """Scrape until every request has been counted: a request is counted after its
    last byte went out, so the client can see the response a moment earlier."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(httpx.get(f"{url}/metrics", timeout=10).text)
        counted = sum(
            v
            for (name, labels), v in samples.items()
            if name == "otari_http_requests_total" and ("endpoint", CHAT) in labels
        )
        if counted >= requests or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_scrape_counts_exactly_what_was_sent_across_two_processes(gateway, two_metered_gateways):
    set_price()
    stream_model = priced("gpt-4o-mini-chunks-7")
    priced("gpt-4o-mini-fail-500")
    priced("gpt-4o-mini-fail-429")
    _, alice = make_key(make_user(budget=make_budget(max_budget_usd=Decimal("10"))))
    _, broke = make_key(make_user(budget=make_budget(max_budget_usd=Decimal("0"))))
    _, limited = make_key(make_user(rpm_limit=1))
    urls = [server.url for server in two_metered_gateways]
    sent = 0

    def post(key: str | None, **body) -> httpx.Response:
        nonlocal sent
        url = urls[sent % 2]  # alternate between the processes
        sent += 1
        body.setdefault("model", "openai:gpt-4o-mini")
        body.setdefault("messages", [{"role": "user", "content": PROMPT}])
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(url + CHAT, json=body, headers=headers, timeout=30)

    statuses = [post(alice).status_code for _ in range(6)]
    statuses += [post(alice, model=stream_model, stream=True).status_code for _ in range(3)]
    statuses += [post(alice, model="openai:gpt-4o-mini-fail-500").status_code for _ in range(2)]
    statuses += [post(alice, model="openai:gpt-4o-mini-fail-429").status_code]
    statuses += [post("gw-not-a-key").status_code, post(None).status_code]
    statuses += [post(broke).status_code for _ in range(2)]
    statuses += [post(limited).status_code for _ in range(2)]
    assert statuses == [200] * 9 + [502, 502, 429, 401, 401, 403, 403, 200, 429]

    first = _scrape_until(urls[0], sent)
    second = _scrape_until(urls[1], sent)

    for samples in (first, second):
        # Requests by endpoint and status, from both processes.
        by_status = {
            status: value(
                samples, "otari_http_requests_total", endpoint=CHAT, method="POST", status=status
            )
            for status in ("200", "401", "403", "429", "502")
        }
        assert by_status == {"200": 10, "401": 2, "403": 2, "429": 2, "502": 2}
        assert value(samples, "otari_http_request_duration_seconds_count", endpoint=CHAT) == 18
        assert value(samples, "otari_gateway_overhead_seconds_count", endpoint=CHAT) == 18
        # Tokens by provider, model and type: 7 answers of 20 tokens, 3 streams of 7.
        tokens = {
            (labels_model, kind): value(
                samples, "otari_tokens_total", provider="openai", model=labels_model, type=kind
            )
            for labels_model in ("gpt-4o-mini", "gpt-4o-mini-chunks-7")
            for kind in ("input", "output")
        }
        assert tokens == {
            ("gpt-4o-mini", "input"): 7 * P,
            ("gpt-4o-mini", "output"): 7 * 20,
            ("gpt-4o-mini-chunks-7", "input"): 3 * P,
            ("gpt-4o-mini-chunks-7", "output"): 3 * 7,
        }
        # Cost, to the micro-dollar: what the usage rows say, and what the prices say.
        for model, requests, output in (("gpt-4o-mini", 7, 20), ("gpt-4o-mini-chunks-7", 3, 7)):
            scraped = value(samples, "otari_cost_usd_total", provider="openai", model=model)
            logged = UsageLog.objects.filter(model=model).aggregate(total=Sum("cost_usd"))
            expected = requests * cost_usd(TokenUsage(input_tokens=P, output_tokens=output), RATES)
            assert logged["total"] == expected
            assert Decimal(scraped).quantize(Decimal("0.000001")) == expected
        assert value(samples, "otari_provider_errors_total", **_error("provider_error")) == 2
        assert value(samples, "otari_provider_errors_total", **_error("provider_rate_limited")) == 1
        assert value(samples, "otari_auth_failures_total", reason="invalid_api_key") == 1
        assert value(samples, "otari_auth_failures_total", reason="missing_api_key") == 1
        assert value(samples, "otari_budget_rejections_total") == 2
        assert value(samples, "otari_rate_limit_rejections_total", scope="user", limit="rpm") == 1
        # Computed from the database at scrape time.
        assert value(samples, "otari_open_holds") == 0
        assert value(samples, "otari_reserved_usd") == 0
        # Only the scrape itself is in flight.
        assert value(samples, "otari_http_requests_in_flight") == 1


@pytest.mark.postgres
@pytest.mark.slow
def test_a_dead_process_leaves_its_counts_but_not_its_requests_in_flight(
    gateway, two_metered_gateways
):
    doomed, survivor = two_metered_gateways
    set_price()
    hanging = priced("gpt-4o-mini-hang")
    _, secret = make_key(make_user())
    assert post_chat(doomed.url, secret).status_code == 200
    thread = threading.Thread(target=post_chat, args=(doomed.url, secret, hanging), daemon=True)
    thread.start()
    assert gateway.fake.wait_for(lambda: gateway.fake.hits == 2, timeout=10)
    # The hanging request and the scrape itself.
    assert value(_scrape_until(survivor.url, 1), "otari_http_requests_in_flight") == 2

    doomed.kill()  # SIGKILL: it runs no exit handler

    samples = _scrape_until(survivor.url, 1)
    assert value(samples, "otari_http_requests_in_flight") == 1
    assert (
        value(samples, "otari_http_requests_total", endpoint=CHAT, method="POST", status="200") == 1
    )


def post_chat(url: str, secret: str, model: str = "openai:gpt-4o-mini") -> httpx.Response | None:
    try:
        return httpx.post(
            url + CHAT,
            json={"model": model, "messages": [{"role": "user", "content": PROMPT}]},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )
    except httpx.TransportError:  # its server was killed
        return None


def _error(error_class: str) -> dict[str, str]:
    return {"provider": "openai", "error_class": error_class}


# --- in the test process ----------------------------------------------------------------------


def test_metrics_are_off_by_default_and_need_a_token_when_on(gateway, settings):
    settings.OTARI_ENABLE_METRICS = False
    with gateway.client() as client:
        assert client.get("/metrics").status_code == 404
        # On, with no token: no scrape can be right, and the answer says what to set.
        settings.OTARI_ENABLE_METRICS = True
        refused = client.get("/metrics")
        assert refused.status_code == 403
        assert "OTARI_METRICS_TOKEN" in refused.json()["detail"]
        assert "otari_" not in refused.text
        assert client.get("/metrics", headers={"Authorization": "Bearer x"}).status_code == 403

        settings.OTARI_METRICS_TOKEN = "scrape-token-1234"
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json() == {"detail": "Invalid or missing metrics token"}
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = client.get("/metrics", headers={"Authorization": "Bearer scrape-token-1234"})
        assert right.status_code == 200
        assert right.headers["content-type"].startswith("text/plain")
        assert "otari_http_requests_total" in right.text


def test_the_operator_can_opt_out_of_the_token(gateway, settings):
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_PUBLIC = True
    with gateway.client() as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert "otari_http_requests_total" in response.text
        # A token, once set, is required all the same.
        settings.OTARI_METRICS_TOKEN = "scrape-token-1234"
        assert client.get("/metrics").status_code == 401


def test_open_holds_and_reserved_money_are_read_at_scrape_time(gateway, settings):
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_PUBLIC = True
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    holds.hold_open(
        user_id=user.user_id,
        request_id=uuid.uuid4(),
        amount_usd=Decimal("1.234567"),
        model_key="openai:gpt-4o-mini",
        now=timezone.now(),
    )
    samples = scrape(gateway.client().get("/metrics").text)
    assert value(samples, "otari_open_holds") == 1
    assert value(samples, "otari_open_holds_usd") == pytest.approx(1.234567)
    assert value(samples, "otari_reserved_usd") == pytest.approx(1.234567)


def test_route_templates_label_requests_whatever_the_path(gateway, settings):
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_PUBLIC = True

    def delta(after: dict, **labels: str) -> float:
        return value(after, "otari_http_requests_total", **labels) - value(
            before, "otari_http_requests_total", **labels
        )

    with gateway.client() as client:
        before = scrape(client.get("/metrics").text)
        client.get("/api/v1/models")
        client.get("/no/such/path/12345")
        client.get("/no/such/path/67890")
        # A request is counted once its last byte is out: the client may be faster.
        deadline = time.monotonic() + 5
        while True:
            after = scrape(client.get("/metrics").text)
            if delta(after, endpoint="unmatched", method="GET", status="404") >= 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)

    # /api/v1/... is the same endpoint as /v1/...; unknown paths share one label.
    assert delta(after, endpoint="/v1/models", method="GET", status="401") == 1
    assert delta(after, endpoint="unmatched", method="GET", status="404") == 2
    assert not any("12345" in str(labels) for _, labels in after)


def test_overhead_excludes_the_time_spent_waiting_on_the_provider(gateway):
    set_price()
    model = priced("gpt-4o-mini-slow-400")
    _, secret = make_key(make_user())
    started = time.perf_counter()
    response = gateway.chat(secret, model=model)
    elapsed_ms = (time.perf_counter() - started) * 1000

    assert response.status_code == 200
    overhead_ms = float(response.headers["X-Otari-Overhead-Ms"])
    assert elapsed_ms >= 400
    assert 0 < overhead_ms < elapsed_ms - 350
    # Refusals are all overhead, and say so too.
    refused = gateway.chat("gw-not-a-key", model=model)
    assert refused.status_code == 401
    assert float(refused.headers["X-Otari-Overhead-Ms"]) >= 0
    assert refused.headers["X-Otari-Request-Id"]


def test_the_outbox_backlog_and_dead_letters_are_read_at_scrape_time(gateway, settings):
    """Two attempt reports written with a usage row; the platform refuses one for good
    (404, non-retryable: a dead letter) and has not been sent the other yet."""
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_PUBLIC = True
    user = make_user()
    reports = tuple(
        AttemptReport(
            correlation_id=f"metrics-attempt-{n}",
            platform_request_id="metrics-request",
            position=n,
            provider="openai",
            model="gpt-4o-mini",
            status=UsageReport.Outcome.ERROR,
            is_final_attempt=n == 1,
            error_class="provider_error",
        )
        for n in range(2)
    )
    # Platform mode off while they are written: delivery leaves them pending.
    settings.OTARI_PLATFORM_URL = settings.OTARI_PLATFORM_TOKEN = ""
    holds.usage_record(
        record=ledger.UsageRecord(
            request_id=uuid.uuid4(),
            user_id=user.user_id,
            api_key_id=None,
            endpoint=CHAT,
            provider="openai",
            model="gpt-4o-mini",
            status="error",
            status_code=502,
            reports=reports,
        ),
        now=timezone.now(),
    )
    assert _outbox(gateway) == (2, 0)

    with FakePlatform(usage_default=Reply(status=404)) as platform:
        settings.OTARI_PLATFORM_URL, settings.OTARI_PLATFORM_TOKEN = platform.url, GATEWAY_TOKEN
        delivery = usage_report_deliver(correlation_id="metrics-attempt-0")
    assert delivery.status == "dead"

    assert _outbox(gateway) == (1, 1)


def _outbox(gateway) -> tuple[float, float]:
    samples = scrape(gateway.client().get("/metrics").text)
    return value(samples, "otari_outbox_backlog"), value(samples, "otari_outbox_dead_letters")
