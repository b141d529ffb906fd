"""dialogpt_zh: Chinese chit-chat with a forward GPT-2 and a backward (MMI) reranker.

Data flows one way: corpus readers -> sessions -> token store -> trainer -> checkpoint ->
one engine (generate + rerank) -> thin faces (CLI, web, evaluate, benchmarks).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ChatBot", "Reply", "Candidate", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import dialogpt_zh` (e.g. for the preprocessor) does not import torch.
    if name in ("ChatBot", "Reply", "Candidate"):
        from dialogpt_zh.engine import bot

        return getattr(bot, name)
    raise AttributeError(name)
