"""Headless Chromium for the browser tests: the browser, a page on the test web server, logging in.

Screenshots of the pages go to ``ARTIFACTS`` (test-artifacts/).
"""

from __future__ import annotations

import os

import pytest
from conftest import PROJECT_ROOT
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop in this thread; the ORM calls of the test
    # itself are still plain synchronous code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(base_url=web_server.url, viewport={"width": 1280, "height": 1000},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def log_in(page, django_user_model):
    django_user_model.objects.create_user("ada", password="ada-long-password-1")
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", "ada-long-password-1")
    page.click("button[type=submit]")
    expect(page).to_have_url("/jobs/")
