"""How a reply is shown on the web page: the chat messages and the candidates table.

Shared by the chat page (webapp.py) and its judging controls (web_judging.py); kept apart so that neither
imports the other's module (the package has no import cycle).
"""
from __future__ import annotations

from typing import Any, Sequence

import gradio as gr

from dialogpt_zh.settings import score_formula, score_terms


def candidate_headers(normalize: str = "mean") -> list[str]:
    """The table's column names. The two log-prob columns hold what enters the final score (settings.mmi_score):
    per token with normalize "mean" (the default), summed with "sum"; the status line gives the formula."""
    unit = "每词元平均" if normalize == "mean" else "总和"
    return ["排名", "选中", "候选回复", f"前向 ln P(回复|上文) {unit}", f"后向 ln P(上文|回复) {unit}", "最终得分",
            "词元数", "采到次数", "来源", "检索相似度"]


CANDIDATE_HEADERS = candidate_headers("mean")
# what the formula calls the columns (the forward and backward log-prob columns, the reply's token count)
FORMULA_NAMES = ("前向", "后向", "词元数")
# Candidate.source as the page shows it: sampled by the model, a human reply from the index, or both
SOURCE_LABELS = {"sampled": "生成", "retrieved": "检索", "sampled+retrieved": "生成+检索", "given": "给定",
                 "given+retrieved": "给定+检索"}


def history_to_messages(history: Sequence[str]) -> list[dict[str, str]]:
    """Alternating utterances (user first) -> Chatbot messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(history)]


def candidates_table(reply) -> list[list[Any]]:
    """One row per candidate, in rank order; the chosen one (rank 1) is marked. The log-prob columns are the
    values the score is computed from (`score_legend` says how)."""
    rows = []
    for c in sorted(reply.candidates, key=lambda c: c.rank):
        # None: not computed (a retrieved reply's forward term, MMI's backward term when off): its weight is 0
        has_fwd, has_bwd = c.forward_logprob is not None, c.backward_logprob is not None
        fwd, bwd = score_terms(float(c.forward_logprob) if has_fwd else 0.0,
                               float(c.backward_logprob) if has_bwd else 0.0,
                               c.num_tokens, c.num_context_tokens, reply.normalize)
        rows.append([
            c.rank,
            "★" if c.rank == 1 else "",
            c.text,
            round(float(fwd), 3) if has_fwd else None,
            round(float(bwd), 3) if has_bwd else None,
            round(float(c.score), 3),
            c.num_tokens,
            getattr(c, "count", 1),
            SOURCE_LABELS.get(getattr(c, "source", "sampled"), getattr(c, "source", "sampled")),
            None if getattr(c, "similarity", None) is None else round(float(c.similarity), 3),
        ])
    return rows


def score_legend(reply) -> str:
    """One line: how this reply's final scores were computed from the table's columns, with its weights."""
    unit = "每词元平均" if reply.normalize == "mean" else "总和"
    retrieved = any("retrieved" in getattr(c, "source", "sampled") for c in reply.candidates)
    formula = score_formula(reply.weights, reply.normalize, FORMULA_NAMES, score="最终得分",
                            retrieved_bonus=getattr(reply, "retrieved_bonus", 0.0) if retrieved else None,
                            retrieved="检索")
    return (f"{formula}（前向、后向为自然对数概率的{unit}；词元数含结尾的 [SEP]"
            + ("；来源含检索时“检索”为 1，否则为 0" if retrieved else "") + "）")


def checked_textbox(name: str, **kwargs: Any) -> gr.Textbox:
    """A gr.Textbox whose value from an API client must be text (or null, an empty box): gr.Textbox passes on
    str() of anything, so a list ["你好"] was chatted with as "['你好']" and saved as a better reply. (The check
    wraps the instance's preprocess, as webapp.checked_slider does.)"""
    box = gr.Textbox(**kwargs)
    plain = box.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is not None and not isinstance(payload, str):
            raise gr.Error(f"{name}: must be text, got {type(payload).__name__}")
        return plain(payload)

    box.preprocess = preprocess
    return box
