"""Take the documentation screenshot of the chat page: start the app, chat a few turns in headless Debian
chromium (Playwright, no browser download), save a PNG.

  python web/screenshot.py                                   # embedded checkpoints/default -> docs/web_screenshot.png
  python web/screenshot.py --model runs/bot --out /tmp/page.png --messages 你好 周末去哪玩
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import dialogpt_zh  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="bot directory (default: embedded checkpoints/default)")
    parser.add_argument("--backward", default=None, help="backward model dir, when --model is a forward model dir")
    parser.add_argument("--out", default=str(REPO / "docs" / "web_screenshot.png"), help="PNG to write")
    parser.add_argument("--messages", nargs="+", default=["你好呀", "周末有什么安排？"], help="turns to type")
    parser.add_argument("--seed", type=int, default=0, help="seed of every reply (reproducible screenshot)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser binary")
    args = parser.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from dialogpt_zh import webapp
    from dialogpt_zh.engine.bot import ChatBot

    demo = webapp.build_app(ChatBot.from_pretrained(args.model, backward=args.backward), seed=args.seed)
    url = webapp.launch_in_background(demo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            box = page.locator("#message textarea")
            for i, message in enumerate(args.messages, 1):
                box.fill(message)
                box.press("Enter")
                expect(page.locator('#chat [data-testid="bot"]')).to_have_count(i, timeout=60_000)
            expect(page.locator("#candidates")).to_contain_text("★")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
