"""Browser tests: Debian's Chromium, driven by Playwright, against a live server and a real worker.

Nothing downloads a browser: Playwright launches the Chromium binary at
``CHROMIUM_PATH`` (default ``/usr/bin/chromium``, Debian's package). Without
it these tests alone are skipped, saying how to enable them; ``.ci/run``
installs it. Screenshots of each stage go to ``BROWSER_ARTIFACTS_DIR``
(default ``test-results/browser``), one folder per test.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
ENABLE = (
    "install Debian's Chromium (`sudo apt-get install chromium`) or point CHROMIUM_PATH at a "
    "Chromium binary; `.ci/run` installs it"
)


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    return path if os.access(path, os.X_OK) else shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip(f"browser tests need Chromium, which is not installed: {ENABLE}")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop on this thread while it runs; the
    # tests' ORM calls (and the database teardown) are still synchronous code,
    # which Django would otherwise refuse.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=path,
                headless=True,
                args=["--no-sandbox", "--disable-dev-shm-usage"],
            )
            yield browser
            browser.close()


@pytest.fixture
def artifacts(request) -> Path:
    """This test's output folder for screenshots."""
    base = Path(os.environ.get("BROWSER_ARTIFACTS_DIR", ROOT / "test-results" / "browser"))
    folder = base / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def staff_page(browser, live_server, django_user_model):
    """A browser tab logged in to the admin as a superuser (session cookie, same origin)."""
    from django.test import Client

    user = django_user_model.objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": live_server.url,
            }
        ]
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "favicon" not in (m.location or {}).get("url", "")
            else None
        ),
    )
    yield page
    context.close()
    assert errors == [], f"the page reported JavaScript errors: {errors}"
