"""Drives the console in headless Chromium (the system's, from Debian's packages) as a person
would: signs in with the keyboard, reads each page, signs out. Saves a screenshot per page.

Usage: browser.py GATEWAY_URL ADMIN_KEY SCREENSHOT_DIR (Chromium's path in REPRISE_BROWSER).
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

base, admin_key, shots = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(shots, exist_ok=True)

with sync_playwright() as playwright:
    # As root (CI containers), Chromium's sandbox cannot start.
    browser = playwright.chromium.launch(
        executable_path=os.environ["REPRISE_BROWSER"], args=["--no-sandbox"]
    )
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{base}/console")
    key = page.get_by_label("Admin key")
    expect(key).to_be_focused()
    page.screenshot(path=f"{shots}/sign-in.png")

    key.fill("not-the-key")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_have_text("That is not the admin key.")

    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Providers")).to_be_visible()
    # The session cookie is HttpOnly: invisible to page scripts.
    assert page.evaluate("document.cookie") == "", page.evaluate("document.cookie")

    providers = page.locator("#providers tbody tr")
    expect(providers.first).to_be_visible()
    expect(page.locator("#providers")).to_contain_text("mock/ok")
    expect(page.locator("#providers")).to_contain_text("closed")
    expect(page.locator("#prompts")).to_contain_text("support")
    expect(page.locator("#prompts")).to_contain_text("v1 50%, v2 50% (experiment)")
    expect(page.get_by_role("heading", name="Experiment on production: running")).to_be_visible()
    arms = page.get_by_role("table", name="Arms of support production")
    expect(arms.get_by_role("row")).to_have_count(3)
    page.screenshot(path=f"{shots}/overview.png", full_page=True)

    # The header's controls come first in the keyboard order.
    focused = []
    for _ in range(3):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert focused == ["Providers", "Prompts", "Sign out"], focused

    # A rollout change through the form: 80/20, the experiment kept.
    page.get_by_label("v1 weight").fill("80")
    page.get_by_label("v2 weight").fill("20")
    page.get_by_role("button", name="Apply weights").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    expect(page.locator("#prompts")).to_contain_text("production: v1 80%, v2 20% (experiment)")
    trail = page.get_by_role("table", name="Audit trail of support")
    expect(trail).to_contain_text("adjust-rollout production")
    expect(trail).to_contain_text("console")
    page.screenshot(path=f"{shots}/rollout-changed.png", full_page=True)

    # And undone with the label's rollback.
    page.get_by_role("button", name="Roll back production").click()
    expect(page.locator("#prompts")).to_contain_text("production: v1 50%, v2 50% (experiment)")
    expect(trail).to_contain_text("rollback production")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert not errors, errors
    browser.close()

print("console: signed in, read providers and prompts, signed out")
