"""Ten sample conversations with a bot, for the README: real output, every one shown, none picked.

The user's lines below were written before the default models were trained; the bot answers each with the
engine's default settings and seed = SEED + turn index. Output is Markdown.

    python corpus/recipes/sample_conversations.py [--model checkpoints/default] [--seed 0]
"""
from __future__ import annotations

import argparse

from dialogpt_zh import ChatBot

SCRIPTS: list[list[str]] = [
    ["你好", "在干嘛呢"],
    ["今天天气真好", "要不要出去走走"],
    ["我最近工作好累", "天天加班到很晚"],
    ["你喜欢看电影吗", "最近有什么好看的电影"],
    ["周末你一般做什么", "我喜欢去爬山"],
    ["你吃饭了吗", "我想吃火锅"],
    ["推荐一首歌给我吧", "我喜欢安静一点的"],
    ["你去过北京吗", "故宫好玩吗"],
    ["哈哈哈哈太好笑了", "你看那个视频了吗"],
    ["晚安", "明天见"],
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bot directory (default: checkpoints/default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first bot turn (default: 0)")
    args = ap.parse_args()
    bot = ChatBot.from_pretrained(args.model)
    turn = 0
    for i, script in enumerate(SCRIPTS, 1):
        history: list[str] = []
        print(f"**{i}.**")
        for user in script:
            history.append(user)
            reply = bot.reply(history, seed=args.seed + turn)
            turn += 1
            history.append(reply.text)
            print(f"- 用户：{user}")
            print(f"- 机器人：{reply.text}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
