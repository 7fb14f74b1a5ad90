"""Drives the console in headless Chromium (the system's, from Debian's packages) as a person
would: signs in with the keyboard, opens every page, changes a rollout, marks a semantic hit
wrong, opens a request's detail, signs out. Saves a screenshot per page.

Usage: browser.py GATEWAY_URL ADMIN_KEY SCREENSHOT_DIR FAILOVER_REQUEST_ID ITS_ATTEMPTS
(Chromium's path in REPRISE_BROWSER).
"""

import os
import re
import sys

from playwright.sync_api import expect, sync_playwright

base, admin_key, shots, failover_request, failover_attempts = sys.argv[1:6]
os.makedirs(shots, exist_ok=True)

with sync_playwright() as playwright:
    # As root (CI containers), Chromium's sandbox cannot start.
    browser = playwright.chromium.launch(
        executable_path=os.environ["REPRISE_BROWSER"], args=["--no-sandbox"]
    )
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def check_labels():
        """Every control on the visible page has a name a screen reader reads, every table a
        caption, every chart a description."""
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll(
                 "main > section:not([hidden]) :is(input:not([type=hidden]), select, button, table, svg)")]
               .filter((el) => {
                 if (el.tagName === "TABLE") return !el.caption || !el.caption.textContent.trim();
                 if (el.tagName === "svg") return el.getAttribute("role") !== "img" || !el.getAttribute("aria-label");
                 return !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.textContent.trim();
               })
               .map((el) => el.outerHTML.slice(0, 120))"""
        )
        assert not unnamed, unnamed

    def open_page(name, heading):
        check_labels()
        page.get_by_role("navigation", name="Sections").get_by_role("link", name=name).click()
        expect(page.get_by_role("heading", name=heading, level=2)).to_be_focused()
        expect(page.get_by_role("link", name=name)).to_have_attribute("aria-current", "page")

    page.goto(f"{base}/console")
    key = page.get_by_label("Admin key")
    expect(key).to_be_focused()
    page.screenshot(path=f"{shots}/sign-in.png")

    key.fill("not-the-key")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_have_text("That is not the admin key.")

    page.get_by_label("Admin key").fill(admin_key)
    page.get_by_role("button", name="Sign in").click()
    # The session cookie is HttpOnly: invisible to page scripts.
    assert page.evaluate("document.cookie") == "", page.evaluate("document.cookie")

    # The header's controls come first in the keyboard order, after the skip link.
    focused = []
    for _ in range(8):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert focused == [
        "Skip to the page", "Overview", "Cache review", "Prompts", "Providers", "Keys",
        "Requests", "Sign out",
    ], focused

    # Overview: the figures and a chart per measure, each described for screen readers.
    expect(page.get_by_role("heading", name="Overview", level=2)).to_be_visible()
    overview = page.locator("#overview")
    def figure(name):
        return overview.locator(".totals div").filter(
            has=page.locator("dt", has_text=re.compile(f"^{name}$"))
        ).locator("dd")

    expect(figure("Requests")).to_have_text("6")
    expect(figure("Exact hits")).to_have_text("1")
    expect(figure("Semantic hits")).to_have_text("1")
    expect(figure("Cache hit ratio")).to_have_text("33.3%")
    for chart in ["Requests and errors", "Cache hit ratio", "Latency", "Spend and money saved"]:
        expect(overview.get_by_role("img", name=re.compile(f"^{chart}, 1h: latest"))).to_be_visible()
    by_route = page.get_by_role("table", name="By route")
    expect(by_route).to_contain_text("chat")
    expect(by_route).to_contain_text("flaky")
    # Filtering by route through the keyboard redraws the figures of that route only.
    overview.get_by_label("Route").select_option("flaky")
    expect(page.get_by_role("table", name="By route").get_by_role("row")).to_have_count(2)
    expect(figure("Requests")).to_have_text("1")
    overview.get_by_label("Route").select_option("")
    overview.get_by_label("Window").select_option("24h")
    expect(overview.get_by_role("img", name=re.compile("^Requests and errors, 24h"))).to_be_visible()
    page.screenshot(path=f"{shots}/overview.png", full_page=True)

    # Cache review: the paraphrase next to the question it was answered as; marked wrong.
    open_page("Cache review", "Cache review")
    hits = page.get_by_role("table", name="Recent semantic hits")
    hit = hits.get_by_role("row").filter(has_text="How can I cancel my order?")
    expect(hit).to_contain_text("How do I cancel my order?")
    expect(hit).to_contain_text("similarity 0.")
    expect(page.get_by_role("table", name="Guard refusals by kind (last day)")).to_contain_text("numbers")
    expect(page.get_by_role("table", name="Recent refusals")).to_contain_text("Cancel order 1243")
    page.screenshot(path=f"{shots}/cache.png", full_page=True)
    hit.get_by_role("button", name="Mark the answer to “How can I cancel my order?” wrong").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    expect(hit).to_contain_text("marked wrong")

    # Prompts: versions with their diff, the experiment, a rollout change and its rollback.
    open_page("Prompts", "Prompts")
    prompts = page.locator("#prompts")
    expect(prompts).to_contain_text("v1 50%, v2 50% (experiment)")
    expect(page.get_by_role("heading", name="Experiment on production: running")).to_be_visible()
    arms = page.get_by_role("table", name="Arms of support production")
    expect(arms.get_by_role("row")).to_have_count(3)
    # Opened from the keyboard.
    page.get_by_role("button", name="Diff v1 → v2").focus()
    page.keyboard.press("Enter")
    diff = page.get_by_label("Diff of support v1 to v2")
    expect(diff).to_contain_text('-content = "Answer: {{ q }}"')
    expect(diff).to_contain_text('+content = "Answer kindly: {{ q }}"')
    page.screenshot(path=f"{shots}/prompts.png", full_page=True)

    # A rollout change through the form: 80/20, the experiment kept.
    page.get_by_label("v1 weight").fill("80")
    page.get_by_label("v2 weight").fill("20")
    page.get_by_role("button", name="Apply weights").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    expect(prompts).to_contain_text("production: v1 80%, v2 20% (experiment)")
    trail = page.get_by_role("table", name="Audit trail of support")
    expect(trail).to_contain_text("adjust-rollout production")
    expect(trail).to_contain_text("console")
    page.screenshot(path=f"{shots}/rollout-changed.png", full_page=True)

    # And undone with the label's rollback.
    page.get_by_role("button", name="Roll back production").click()
    expect(prompts).to_contain_text("production: v1 50%, v2 50% (experiment)")
    expect(trail).to_contain_text("rollback production")

    # A rollout started on another label, then stopped keeping the new version.
    start = page.get_by_role("form", name="Start a rollout of support staging")
    start.get_by_label("New version").fill("2")
    start.get_by_label("Its share %").fill("10")
    start.get_by_role("button", name="Start rollout").click()
    expect(prompts).to_contain_text("staging: v1 90%, v2 10%")
    page.get_by_role("group", name="Stop the rollout of support staging").get_by_role(
        "button", name="Stop rollout: keep v2"
    ).click()
    expect(prompts).to_contain_text("staging: v2")
    expect(trail).to_contain_text("start-rollout staging")

    # Providers: breakers, and the attempts of the last hour per target.
    open_page("Providers", "Providers")
    expect(page.get_by_role("table", name="Breakers")).to_contain_text("mock/ok")
    attempts = page.get_by_role("table", name="Upstream attempts (last hour)")
    failing = attempts.get_by_role("row").filter(has_text="mock/status-503")
    expect(failing).to_contain_text("100.0%")
    expect(attempts.get_by_role("row").filter(has_text="mock2/ok")).to_contain_text("0.0%")
    page.screenshot(path=f"{shots}/providers.png", full_page=True)

    # Keys: the key's limits, spend and budget.
    open_page("Keys", "Keys")
    key_row = page.get_by_role("table", name="Keys").get_by_role("row").filter(has_text="support bot")
    expect(key_row).to_contain_text("rpm 600, budget $5.00/month")
    expect(key_row).to_contain_text("left of $5.00")
    page.screenshot(path=f"{shots}/keys.png", full_page=True)

    # Requests: filtered, then one request's detail with both of its attempts.
    open_page("Requests", "Requests")
    listed = page.get_by_role("table", name="Requests, newest first")
    expect(listed.get_by_role("row")).to_have_count(7)
    log = page.locator("#requests")
    log.get_by_label("Cache").select_option("semantic-hit")
    expect(listed.get_by_role("row")).to_have_count(2)
    log.get_by_label("Cache").select_option("")
    log.get_by_label("Route").fill("flaky")
    page.keyboard.press("Enter")
    expect(listed.get_by_role("row")).to_have_count(2)
    page.screenshot(path=f"{shots}/requests.png", full_page=True)
    page.get_by_role("button", name=f"Details of {failover_request}").click()
    expect(page.get_by_role("heading", name=f"Request {failover_request}")).to_be_focused()
    attempts = page.get_by_role("table", name=f"Attempts of {failover_request}")
    expect(attempts.get_by_role("row")).to_have_count(int(failover_attempts) + 1)
    expect(attempts).to_contain_text("mock/status-503")
    expect(attempts).to_contain_text("failover")
    page.screenshot(path=f"{shots}/request-detail.png", full_page=True)

    check_labels()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert not errors, errors
    browser.close()

print("console: signed in, opened every page, changed a rollout, marked a hit wrong, signed out")
