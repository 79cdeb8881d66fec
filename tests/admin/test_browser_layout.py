"""The console on a 1366x768 laptop screen: every changelist and the dashboard fit the
window without horizontal scrolling, and the columns that matter (when, who, model,
status, cost) are on screen. Through the real login, in Debian's headless Chromium."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from common.money import format_usd
from tests.admin.test_browser import ADMIN_PASSWORD, ARTIFACTS, browser  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LAPTOP = {"width": 1366, "height": 768}

# What overflows: the page itself, or a scroll box inside it (Django wraps the results
# table in a div that scrolls sideways, so the page alone would not show it).
_OVERFLOW_JS = """() => {
  const out = [];
  const width = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > width + 1)
    out.push("page " + document.documentElement.scrollWidth + " > " + width);
  for (const el of document.querySelectorAll("#content *")) {
    if (el.scrollWidth > el.clientWidth + 1) {
      const style = getComputedStyle(el);
      if (["auto", "scroll"].includes(style.overflowX))
        out.push((el.id || el.className) + " " + el.scrollWidth + " > " + el.clientWidth);
    }
  }
  return out;
}"""

# Column headers (changelist field names) that must be visible on the usage log.
KEY_COLUMNS = ["when", "owner", "model_name", "outcome", "cost"]


@pytest.fixture
def laptop(browser, gateway, django_user_model, settings):  # noqa: F811
    settings.SESSION_EXPIRE_AT_BROWSER_CLOSE = True
    settings.CSRF_COOKIE_AGE = None
    django_user_model.objects.create_superuser("ops", "ops@example.com", ADMIN_PASSWORD)
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(gateway.url + "/admin/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", ADMIN_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    yield page
    context.close()


def _changelists() -> list[tuple[str, str]]:
    """Every changelist the console registers (a new one is covered without a test edit)."""
    pages = []
    for model in admin.site._registry:
        name = f"{model._meta.app_label}.{model._meta.model_name}"
        pages.append((name, reverse(f"admin:{name.replace('.', '_')}_changelist")))
    return sorted(pages)


def test_every_changelist_and_the_dashboard_fit_1366px(laptop, gateway):
    from tests.admin.demo import seed_demo_history

    page, base = laptop, gateway.url
    seed_demo_history(now=timezone.now())
    overflowing = {}
    pages = [
        ("dashboard", "/admin/"),
        *_changelists(),
        ("user-page", "/admin/budgets/gatewayuser/ana/change/"),
        ("spend-report-users", "/admin/reports/spend/?by=user"),
        ("spend-report-models", "/admin/reports/spend/?by=model"),
    ]
    for name, url in pages:
        page.goto(base + url)
        found = page.evaluate(_OVERFLOW_JS)
        if found:
            overflowing[name] = found
        page.screenshot(path=str(ARTIFACTS / f"1366-{name}.png"), full_page="page" in name)
    assert overflowing == {}

    # The usage log's key columns are on screen, not off to the side.
    page.goto(base + "/admin/usage/usagelog/")
    for column in KEY_COLUMNS:
        box = page.locator(f"#result_list th.column-{column}").bounding_box()
        assert box is not None, column
        assert box["x"] + box["width"] <= LAPTOP["width"], column


def test_usage_log_filters_and_totals_in_the_browser(laptop, gateway):
    """Autocomplete of the user filter, a date range, and the totals over the filter."""
    from tests.admin.demo import seed_demo_history
    from usage.models import UsageLog
    from usage.selectors import usage_totals

    page, base = laptop, gateway.url
    now = timezone.now()
    seed_demo_history(now=now)
    page.goto(base + "/admin/usage/usagelog/")
    page.wait_for_selector("#otari-totals-requests")
    assert page.inner_text("#otari-totals-requests") == f"{UsageLog.objects.count():,}"

    # The user filter suggests as you type (a user's alias finds them).
    page.click("details[data-otari-filter='user'] > summary")
    page.fill("input[name=user]", "Lima")
    options = "[...document.querySelectorAll('#otari-suggest-user option')].map(o => o.value)"
    # Only Ana is suggested (a timeout here means the suggestions never narrowed).
    page.wait_for_function(f"() => {options}.join() === 'ana'")
    page.fill("input[name=user]", "ana")
    page.press("input[name=user]", "Enter")
    page.wait_for_url("**user=ana**")

    # A date range on top of it, as a finance person would pick it.
    first_day = (now - timedelta(days=6)).date()
    page.click("details[data-otari-filter='dates (UTC)'] > summary")
    page.fill("input[name=date_from]", first_day.isoformat())
    page.fill("input[name=date_to]", now.date().isoformat())
    page.click(".otari-date-range button[type=submit]")
    page.wait_for_selector("#otari-totals-cost")
    expected = usage_totals(
        UsageLog.objects.filter(
            user_id="ana", timestamp__gte=datetime.combine(first_day, time.min, tzinfo=UTC)
        )
    )
    assert page.inner_text("#otari-totals-requests") == f"{expected.requests:,}"
    assert page.inner_text("#otari-totals-cost") == format_usd(expected.cost_usd)
    assert "ana" in page.inner_text("details[data-otari-filter='user'] > summary")
    assert page.evaluate(_OVERFLOW_JS) == []
    page.screenshot(path=str(ARTIFACTS / "1366-usage-log-filtered.png"))
