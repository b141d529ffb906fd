"""People judge on the page, in a real browser (Debian chromium + Playwright): pick a candidate in the table,
write a better reply, check the chat continues with them and the feedback file; judge a pair in the arena tab.
"""
from __future__ import annotations

import json

import pytest

from tests.test_web_browser import browser, pytestmark  # noqa: F401  (the same browser fixture, skip and mark)


@pytest.fixture(scope="module")
def app(trained_bot_dir, tmp_path_factory):
    from dialogpt_zh import webapp
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.judging import arena
    from dialogpt_zh.settings import GenerationSettings

    root = tmp_path_factory.mktemp("judging")
    bot = ChatBot.from_pretrained(trained_bot_dir, generation=GenerationSettings(num_candidates=8, max_length=10))
    contexts = [{"context": ["你好"]}, {"context": ["今天天气真好", "是啊"]}]
    pairs, order = arena.make_pairs(contexts, {"A": bot, "B": bot}, {"A": {}, "B": {"num_candidates": 1}}, 0,
                                    progress=False)
    arena.write_pairs(root / "pairs.json", root / "pairs.key.json", pairs, order, {}, {})
    feedback, verdicts = root / "feedback.jsonl", root / "verdicts.jsonl"
    demo = webapp.build_app(bot, feedback=feedback, arena_pairs=root / "pairs.json", arena_verdicts=verdicts)
    url = webapp.launch_in_background(demo)
    yield url, feedback, verdicts, pairs
    demo.close()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_pick_and_better_reply_in_chromium(browser, app):
    from playwright.sync_api import expect

    url, feedback, _, _ = app
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(url)
        box = page.locator("#message textarea")
        box.fill("你好呀")
        box.press("Enter")
        chat, table = page.locator("#chat"), page.locator("#candidates")
        expect(chat.locator('[data-testid="bot"]')).to_have_count(1, timeout=30_000)
        expect(table).to_contain_text("★", timeout=30_000)
        n_rows = table.locator('[data-testid^="cell-"][data-testid$="-2"]').count()
        assert n_rows >= 2, "the tiny bot gave a single distinct candidate; nothing to pick from"
        second = table.locator('[data-testid="cell-1-2"]').inner_text().strip()

        table.locator('[data-testid="cell-1-2"]').click()                  # "I would have chosen this one"
        expect(chat.locator('[data-testid="bot"]')).to_have_text([second], timeout=30_000)
        expect(table.locator('[data-testid="cell-1-1"]')).to_contain_text("✔")
        expect(table.locator('[data-testid="cell-0-1"]')).to_have_text("★")
        expect(page.locator("#status")).to_contain_text("已记录")
        records = read_jsonl(feedback)
        assert len(records) == 1
        assert records[0]["kind"] == "pick" and records[0]["picked_rank"] == 2 and records[0]["reply"] == second
        assert records[0]["context"] == ["你好呀"] and records[0]["source"] == "web"
        assert len(records[0]["candidates"]) == n_rows and "session" not in records[0]

        better = page.locator("#better textarea")                           # "I would have said this"
        better.fill("我会说：你好，邮件写到 xiao.ming@example.com")
        better.press("Enter")
        expect(chat.locator('[data-testid="bot"]')).to_have_text(["我会说：你好，邮件写到 xiao.ming@example.com"],
                                                                 timeout=30_000)
        expect(better).to_have_value("")
        records = read_jsonl(feedback)
        assert len(records) == 2 and records[1]["kind"] == "better" and records[1]["picked_rank"] is None
        assert records[1]["reply"] == "我会说:你好,邮件写到 【邮箱】"                # masked, normalised
        assert "xiao.ming" not in feedback.read_text(encoding="utf-8")

        box.fill("在干嘛")                                                  # the chat continues from the choice
        box.press("Enter")
        expect(chat.locator('[data-testid="bot"]')).to_have_count(2, timeout=30_000)
        table.locator('[data-testid="cell-0-2"]').click()
        expect(page.locator("#status")).to_contain_text("第 1 个候选", timeout=30_000)
        records = read_jsonl(feedback)
        assert len(records) == 3
        assert records[2]["context"] == ["你好呀", "我会说:你好,邮件写到 【邮箱】", "在干嘛"]
        assert records[2]["picked_rank"] == 1 and records[2]["reply"] == records[2]["mmi_reply"]
    finally:
        page.close()


def test_arena_tab_records_verdicts(browser, app):
    from playwright.sync_api import expect

    url, _, verdicts, pairs = app
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_role("tab", name="盲评 Arena").click()
        progress = page.locator("#arena_progress")
        expect(progress).to_contain_text("第 1 / 2 对", timeout=30_000)
        expect(page.locator("#arena_a textarea")).to_have_value(pairs[0]["a"])
        expect(page.locator("#arena_b textarea")).to_have_value(pairs[0]["b"])
        page.locator("#arena_vote_a").click()
        expect(progress).to_contain_text("第 2 / 2 对", timeout=30_000)
        lines = read_jsonl(verdicts)
        assert [(v["pair"], v["verdict"]) for v in lines] == [(pairs[0]["id"], "a")]
        page.reload()                                                       # a new visit continues there
        page.get_by_role("tab", name="盲评 Arena").click()
        expect(progress).to_contain_text("第 2 / 2 对", timeout=30_000)
        page.locator("#arena_vote_tie").click()
        expect(progress).to_contain_text("全部 2 对已评完", timeout=30_000)
        assert [v["verdict"] for v in read_jsonl(verdicts)] == ["a", "="]
    finally:
        page.close()
