"""Times each console page in headless Chromium against a running gateway: a full load of
/console#PAGE (HTML, script, style and the page's admin API calls) until the page is drawn.
Prints one JSON object: page -> list of milliseconds. Run by examples/console_scale.rs.

Usage: console_pages.py GATEWAY_URL ADMIN_KEY RUNS (Chromium's path in REPRISE_BROWSER)
"""

import json
import os
import sys
import time

from playwright.sync_api import sync_playwright

base, admin_key, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
pages = ["overview", "cache", "prompts", "providers", "keys", "requests"]

with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
        executable_path=os.environ["REPRISE_BROWSER"], args=["--no-sandbox"]
    )
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{base}/console")
    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector('main[data-drawn="overview"]', timeout=60_000)
    times = {name: [] for name in pages}
    extra = {"overview 7d": [], "request detail": []}
    for _ in range(runs):
        for name in pages:
            page.goto("about:blank")
            started = time.perf_counter()
            page.goto(f"{base}/console#{name}")
            page.wait_for_selector(f'main[data-drawn="{name}"]', timeout=60_000)
            times[name].append((time.perf_counter() - started) * 1000)
        # The widest window, chosen on the page.
        page.goto(f"{base}/console#overview")
        page.wait_for_selector('main[data-drawn="overview"]')
        page.evaluate("document.querySelector('main').dataset.drawn = ''")
        started = time.perf_counter()
        page.locator("#overview-window").select_option("7d")
        page.wait_for_selector('main[data-drawn="overview"]')
        page.wait_for_selector('svg[aria-label*=", 7d:"]')
        extra["overview 7d"].append((time.perf_counter() - started) * 1000)
        # A request's detail, from the list.
        page.goto(f"{base}/console#requests")
        page.wait_for_selector('main[data-drawn="requests"]')
        started = time.perf_counter()
        page.get_by_role("button", name="Details of").first.click()
        page.wait_for_selector("#requests .detail table")
        extra["request detail"].append((time.perf_counter() - started) * 1000)
    browser.close()
times.update(extra)
print(json.dumps(times))
