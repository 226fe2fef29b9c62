"""The web chat page of `gptforge serve` in a real headless browser: Debian's chromium driven by Playwright's
Python package (no browser download). Type, see streamed text, stop, new chat; a screenshot is saved."""

from __future__ import annotations

import shutil

import pytest

from support.serve_fixtures import API_KEY, running_server
from support.stage_fixtures import sft_reverse_run  # noqa: F401

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")


def test_web_chat_page(sft_reverse_run, tmp_path):
    with running_server(sft_reverse_run, tmp_path / "server.log", "--api-key", API_KEY) as (url, proc), \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/")
            page.wait_for_function("document.title && document.getElementById('title').textContent.includes('·')")
            page.fill("#apikey", API_KEY)
            page.fill("#temperature", "0")
            # turn 1: streamed reply, the model reverses the word
            page.evaluate("""window.updates = 0; new MutationObserver((rs) => window.updates += rs.length).observe(
                document.getElementById('log'), {childList: true, subtree: true, characterData: true})""")
            page.fill("#input", "cafe")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant:not(.streaming)")
            assert page.inner_text(".assistant").strip() == "efac", page.inner_text("#log")
            assert page.get_attribute(".assistant", "data-finish") == "stop"
            assert page.evaluate("window.updates") >= 2 + 4  # two bubbles, then the reply piece by piece
            # turn 2: the conversation is kept in the page (two user bubbles, two replies)
            page.fill("#input", "bead")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.assistant:not(.streaming)').length == 2")
            assert [e.inner_text().strip() for e in page.query_selector_all(".assistant")] == ["efac", "daeb"]
            assert page.evaluate("conversation.length") == 4
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            assert (tmp_path / "serve_page.png").stat().st_size > 5000
            # new chat: the page forgets the conversation
            page.click("#newchat")
            assert page.query_selector_all(".msg") == [] and page.evaluate("conversation.length") == 0
            # stop: throttle the browser's network (DevTools) so the reply takes seconds to arrive, stop it
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 300,
                                                          "downloadThroughput": 150, "uploadThroughput": -1})
            page.fill("#system", "ab")
            page.fill("#input", "fedc")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant.streaming")
            assert page.is_enabled("#stop") and not page.is_enabled("#send")
            page.click("#stop")
            page.wait_for_selector(".assistant:not(.streaming)", timeout=5000)
            last = page.query_selector(".assistant")
            assert last.get_attribute("data-finish") == "stopped" and "[stopped]" in last.inner_text()
            assert len(last.inner_text().replace("[stopped]", "").strip()) < 4  # cut before the reply 'cdef'
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                          "downloadThroughput": -1, "uploadThroughput": -1})
            # new chat again: the next reply sees only the new message
            page.click("#newchat")
            assert page.query_selector_all(".msg") == [] and page.evaluate("conversation.length") == 0
            page.fill("#system", "")
            page.fill("#input", "abcd")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant:not(.streaming)")
            assert page.inner_text(".assistant").strip() == "dcba"
            page.screenshot(path=str(tmp_path / "serve_page_new_chat.png"))
            # self-contained: everything the page loaded came from the server itself
            assert requests and all(r.startswith(url) for r in requests), requests
        finally:
            browser.close()
        assert proc.poll() is None
