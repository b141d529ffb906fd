"""How a reply is shown on the web page: the chat messages and the candidates table.

Shared by the chat page (webapp.py) and its judging controls (web_judging.py); kept apart so that neither
imports the other's module (the package has no import cycle).
"""
from __future__ import annotations

from typing import Any, Sequence

CANDIDATE_HEADERS = ["排名", "选中", "候选回复", "前向 log P(回复|上文)", "后向 log P(上文|回复)", "最终得分",
                     "词元数", "采到次数", "来源", "检索相似度"]
# Candidate.source as the page shows it: sampled by the model, a human reply from the index, or both
SOURCE_LABELS = {"sampled": "生成", "retrieved": "检索", "sampled+retrieved": "生成+检索", "given": "给定",
                 "given+retrieved": "给定+检索"}


def history_to_messages(history: Sequence[str]) -> list[dict[str, str]]:
    """Alternating utterances (user first) -> Chatbot messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(history)]


def candidates_table(reply) -> list[list[Any]]:
    """One row per candidate, in rank order; the chosen one (rank 1) is marked."""
    rows = []
    for c in sorted(reply.candidates, key=lambda c: c.rank):
        rows.append([
            c.rank,
            "★" if c.rank == 1 else "",
            c.text,
            None if c.forward_logprob is None else round(float(c.forward_logprob), 3),
            None if c.backward_logprob is None else round(float(c.backward_logprob), 3),
            round(float(c.score), 3),
            c.num_tokens,
            getattr(c, "count", 1),
            SOURCE_LABELS.get(getattr(c, "source", "sampled"), getattr(c, "source", "sampled")),
            None if getattr(c, "similarity", None) is None else round(float(c.similarity), 3),
        ])
    return rows
