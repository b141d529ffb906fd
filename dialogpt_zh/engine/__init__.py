"""The one reply engine: generate candidates, score them forward and backward (MMI), rank.

`ChatBot` (bot.py) is the API every face uses; decoding, the lean GPT-2 forward, fp16 weights,
sampling filters, the thread policy and the web request batcher live beside it.
"""
from __future__ import annotations

__all__ = ["Candidate", "ChatBot", "Reply", "load_bot"]


def __getattr__(name: str):
    # Lazy: importing a light module of this package (threads) must not import torch.
    if name in __all__:
        from dialogpt_zh.engine import bot

        return getattr(bot, name)
    raise AttributeError(name)
