"""End to end in a real browser: Debian chromium driven by Playwright (no browser download).

CI (.ci/run) apt-installs chromium; where /usr/bin/chromium is absent the tests skip and say how to run them,
in the `-rs` list and in a section just above pytest's last line (tests/conftest.py).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# DIALOGPT_ZH_CHROMIUM: another chromium binary (e.g. another distribution's path)
CHROMIUM = Path(os.environ.get("DIALOGPT_ZH_CHROMIUM", "/usr/bin/chromium"))
_found = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    # a mark, not a fixture skip, so that no model is trained for a test that cannot run
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"browser test not run: chromium not found at {CHROMIUM}"
                       + (f" (but at {_found}: set DIALOGPT_ZH_CHROMIUM)" if _found else "")
                       + "; to run it: `apt-get install chromium` (as .ci/run does), then pytest again"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(trained_bot_dir):
    from dialogpt_zh import webapp
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    bot = ChatBot.from_pretrained(trained_bot_dir, generation=GenerationSettings(num_candidates=6, max_length=12))
    demo = webapp.build_app(bot)
    url = webapp.launch_in_background(demo)
    yield url
    demo.close()


def test_chat_in_chromium_shows_reply_and_candidates(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(app_url)
        expect(page.locator("h1")).to_contain_text("中文闲聊机器人")
        box = page.locator("#message textarea")
        box.fill("你好呀")
        box.press("Enter")                                     # send on Enter

        chat = page.locator("#chat")
        expect(chat.locator('[data-testid="user"]')).to_have_text(["你好呀"], timeout=30_000)
        bot_msg = chat.locator('[data-testid="bot"]')
        expect(bot_msg).to_have_count(1, timeout=30_000)
        reply = bot_msg.inner_text().strip()
        assert reply

        table = page.locator("#candidates")
        expect(table).to_contain_text("★", timeout=30_000)
        chosen = table.locator('[data-testid="cell-0-2"]')   # row 0 (rank 1), column "候选回复"
        expect(chosen).to_have_text(reply)
        expect(table.locator('[data-testid="cell-0-1"]')).to_have_text("★")
        for col in (3, 4, 5):                                 # forward, backward (MMI) and final scores
            assert float(table.locator(f'[data-testid="cell-0-{col}"]').inner_text()) < 0
        expect(page.locator("#status")).to_contain_text("秒")
        expect(page.locator("#status")).to_contain_text("MMI 开")
        expect(box).to_have_value("")

        shot = tmp_path / "web_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        page.locator("#reset").click()                        # reset clears the chat and the table
        expect(chat.locator('[data-testid="user"]')).to_have_count(0)
        expect(table).not_to_contain_text("★")
    finally:
        page.close()


def test_sessions_in_two_tabs_are_separate(browser, app_url):
    from playwright.sync_api import expect

    context_a, context_b = browser.new_context(), browser.new_context()
    try:
        a, b = context_a.new_page(), context_b.new_page()
        for page, text in ((a, "我是小明"), (b, "我叫小红")):
            page.goto(app_url)
            page.locator("#message textarea").fill(text)
            page.locator("#message textarea").press("Enter")
        expect(a.locator('#chat [data-testid="user"]')).to_have_text(["我是小明"], timeout=30_000)
        expect(b.locator('#chat [data-testid="user"]')).to_have_text(["我叫小红"], timeout=30_000)
        expect(a.locator('#chat [data-testid="bot"]')).to_have_count(1, timeout=30_000)
        a.locator("#message textarea").fill("你好")
        a.locator("#message textarea").press("Enter")
        expect(a.locator('#chat [data-testid="user"]')).to_have_text(["我是小明", "你好"], timeout=30_000)
        expect(b.locator('#chat [data-testid="user"]')).to_have_text(["我叫小红"])
    finally:
        context_a.close()
        context_b.close()
