"""The console in a real browser: Debian's headless Chromium driven by Playwright, against
the real ASGI app served by uvicorn on loopback (the `gateway` fixture), which also
serves the chat request made with the key the console created.

Screenshots of the main pages go to test-artifacts/browser/. The tests skip when
/usr/bin/chromium or Playwright is missing, unless OTARI_REQUIRE_BROWSER=1 (CI), which
turns that into a failed run (tests/admin/conftest.py). Playwright never downloads a
browser here.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.utils import timezone

from budgets.models import APIKey, BudgetResetLog, GatewayUser
from budgets.selectors import user_money_annotate, users_refused_for_budget
from budgets.services.keys import secret_hash
from common.admin_tools import format_usd
from tests.admin.conftest import CHROMIUM
from tests.conftest import REPO
from tests.factories import set_price

ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_PASSWORD = "browser-test-pass-1"

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.calendar]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Chromium for this module's tests only: while Playwright's sync API is running it
    keeps an event loop in the main thread, which makes Django refuse synchronous ORM
    calls there (database setup and flushes included). DJANGO_ALLOW_ASYNC_UNSAFE lifts
    that for exactly as long as the browser is open."""
    # Never fetch a browser build: the system's chromium is the one we drive.
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def console(browser, gateway, django_user_model, settings):
    """A logged-in console page on the gateway's server."""
    # The server's clock may be frozen years away from the browser's: cookies without an
    # expiry date are the only ones both agree are live.
    settings.SESSION_EXPIRE_AT_BROWSER_CLOSE = True
    settings.CSRF_COOKIE_AGE = None
    django_user_model.objects.create_superuser("ops", "ops@example.com", ADMIN_PASSWORD)
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(gateway.url + "/admin/")
    shot(page, "01-login")
    page.fill("#id_username", "ops")
    page.fill("#id_password", ADMIN_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    yield page
    context.close()


def shot(page, name: str, *, full_page: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def _messages(page) -> str:
    """The admin's messages on the page a form or action led to."""
    page.wait_for_selector("ul.messagelist")
    return page.inner_text("ul.messagelist")


def test_budget_user_key_request_reset_and_export(console, gateway):
    page, base = console, gateway.url
    set_price()  # openai:gpt-4o-mini, the fake provider's model in tests/conftest.py

    # A budget, through the form.
    page.goto(base + "/admin/budgets/budget/add/")
    page.fill("#id_name", "QA team")
    page.fill("#id_max_budget_usd", "2.50")
    page.select_option("#id_reset_alignment", "calendar_month")
    shot(page, "02-budget-add")
    page.click("input[name=_save]")
    assert "was added successfully" in _messages(page)

    # A user on it.
    page.goto(base + "/admin/budgets/gatewayuser/add/")
    page.fill("#id_user_id", "qa-user")
    page.fill("#id_alias", "QA User")
    page.select_option("#id_budget", label="QA team")
    page.click("input[name=_save]")
    assert "was added successfully" in _messages(page)
    user = GatewayUser.objects.get(pk="qa-user")
    assert user.budget.name == "QA team"
    assert user.next_budget_reset_at is not None

    # A key: the secret is on the next page, once.
    page.goto(base + "/admin/budgets/apikey/add/?user=qa-user")
    page.fill("#id_key_name", "browser test")
    with page.expect_response(lambda r: r.request.method == "POST") as created:
        page.click("input[name=_save]")
    page.wait_for_selector(".otari-secret__value")
    secret = page.input_value(".otari-secret__value")
    shot(page, "03-key-secret-once")
    key = APIKey.objects.get(key_name="browser test")
    assert re.fullmatch(r"gw-[A-Za-z0-9_\-]{64}", secret)
    assert key.key_hash == secret_hash(secret)
    page.click("text=Key settings")
    assert secret not in page.content()
    assert key.key_hash not in page.content()
    # The page that showed it is kept out of every cache (back button included).
    assert "no-store" in created.value.headers["cache-control"]

    # A chat request with that key, through the gateway, to the fake provider.
    response = gateway.chat(secret, model="openai:gpt-4o-mini")
    assert response.status_code == 200
    cost = Decimal(response.headers["X-Otari-Cost-Usd"])
    request_id = response.headers["X-Otari-Request-Id"]
    assert cost > 0

    # The spend on the user's page...
    page.goto(base + "/admin/budgets/gatewayuser/qa-user/change/")
    period = page.inner_text("fieldset:has(h2:text('This period'))")
    assert format_usd(cost) in period
    shot(page, "04-user-after-request")
    # ...and on the dashboard.
    page.goto(base + "/admin/")
    assert page.inner_text("#otari-spend-today") == format_usd(cost)
    assert "QA User" in page.inner_text(".otari-grid")
    assert page.locator(".otari-chart__bar").count() == 30
    shot(page, "05-dashboard")

    # Reset the period with the action.
    page.goto(base + "/admin/budgets/gatewayuser/")
    assert format_usd(cost) in page.inner_text("#result_list")
    page.check("input[name=_selected_action][value='qa-user']")
    page.select_option("select[name=action]", "reset_period_now")
    page.click("button[name=index]")
    assert "Started a fresh budget period for 1 user" in _messages(page)
    shot(page, "06-users-after-reset", full_page=False)
    user.refresh_from_db()
    assert user.spend_usd == 0
    assert user.lifetime_spend_usd == cost
    log = BudgetResetLog.objects.get(user=user, previous_spend_usd=cost)
    assert log.reset_at <= timezone.now()

    # Export the usage log, filtered to this user, as CSV (streamed by the ASGI server).
    page.goto(base + "/admin/usage/usagelog/?user=qa-user")
    shot(page, "07-usage-log", full_page=False)
    with page.expect_download() as download:
        page.click("a.otari-export")
    path = ARTIFACTS / "usage-export.csv"
    download.value.save_as(str(path))
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [(r["request_id"], r["user_id"], r["status"]) for r in rows] == [
        (request_id, "qa-user", "success")
    ]
    assert Decimal(rows[0]["cost_usd"]) == cost
    assert rows[0]["api_key_prefix"] == secret[:10]


def test_console_pages_with_a_month_of_history(console, gateway):
    """The main pages with realistic data (screenshots for docs/ADMIN.md)."""
    from tests.admin.demo import seed_demo_history

    page, base = console, gateway.url
    demo = seed_demo_history(now=timezone.now())
    assert demo.requests > 300

    now = timezone.now()
    refused_today = list(users_refused_for_budget(now=now))
    refused_in_window = user_money_annotate(GatewayUser.objects.all(), now=now).filter(
        budget_refused_at__isnull=False
    )
    assert "eli" in {u.pk for u in refused_in_window}

    page.goto(base + "/admin/")
    assert page.locator(".otari-chart__bar").count() == 30
    assert page.locator(".otari-hbars tr").count() >= 8
    assert "Eli Novak" in page.inner_text(".otari-dashboard")  # over budget
    count = page.inner_text("#otari-refused-budget .otari-card__value")
    assert count == str(len(refused_today))
    names = page.inner_text("#otari-refused-budget .otari-card__note")
    assert names == ", ".join(str(user) for user in refused_today[:3])
    shot(page, "10-dashboard-month")

    page.goto(base + "/admin/budgets/gatewayuser/")
    eli = page.locator("#result_list tbody tr", has_text="Eli Novak")
    assert eli.locator(".otari-usage--over").count() == 1
    assert page.locator(".otari-usage__refused").count() == refused_in_window.count()
    gus = page.locator("#result_list tbody tr", has_text="Gus Moreau")
    assert gus.locator(".otari-usage--near").count() == 1
    shot(page, "11-users")

    page.goto(base + "/admin/budgets/gatewayuser/eli/change/")
    assert "requests do not fit what is left" in page.inner_text("#content-main")

    page.goto(base + "/admin/budgets/gatewayuser/ana/change/")
    assert "Monthly, on the 1st (UTC)" in page.inner_text("#content-main")
    shot(page, "12-user-page")

    page.goto(base + f"/admin/budgets/budget/{demo.budgets['Research'].pk}/change/")
    assert "Ana Lima" in page.inner_text("#content-main")
    shot(page, "13-budget-page")

    for name, url in [
        ("14-budgets", "/admin/budgets/budget/"),
        ("15-keys", "/admin/budgets/apikey/"),
        ("16-usage-log", "/admin/usage/usagelog/"),
        ("17-holds", "/admin/budgets/hold/"),
        ("18-prices", "/admin/usage/modelpricing/"),
        ("19-resets", "/admin/budgets/budgetresetlog/"),
    ]:
        page.goto(base + url)
        assert page.locator("#result_list tbody tr").count() > 0, url
        shot(page, name, full_page=False)

    # The stale hold is released from the holds page's button.
    page.goto(base + "/admin/budgets/hold/?stale=yes")
    assert page.locator("#result_list tbody tr").count() == 1
    page.click("button.otari-tool-button")
    assert "Released 1 stale hold." in _messages(page)
