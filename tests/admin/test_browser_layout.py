"""The console on a 1366x768 laptop screen: every changelist and the dashboard fit the
window without horizontal scrolling, and the columns that matter (when, who, model,
status, cost) are on screen. Through the real login, in Debian's headless Chromium."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

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
    pages = [("dashboard", "/admin/"), *_changelists()]
    for name, url in pages:
        page.goto(base + url)
        found = page.evaluate(_OVERFLOW_JS)
        if found:
            overflowing[name] = found
        page.screenshot(path=str(ARTIFACTS / f"1366-{name}.png"))
    assert overflowing == {}

    # The usage log's key columns are on screen, not off to the side.
    page.goto(base + "/admin/usage/usagelog/")
    for column in KEY_COLUMNS:
        box = page.locator(f"#result_list th.column-{column}").bounding_box()
        assert box is not None, column
        assert box["x"] + box["width"] <= LAPTOP["width"], column
