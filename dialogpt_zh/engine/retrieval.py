"""Retrieved human replies as candidates: which hits of the bot's index a request gets, and how they join the
sampled candidates (one list, duplicates merged, ranked together by the MMI score). The index itself (format,
search): dialogpt_zh/data/retrieval.py; docs/retrieval.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dialogpt_zh.data.retrieval import RETRIEVAL_DIR, Hit, RetrievalIndex, only_echoes
from dialogpt_zh.engine.results import Candidate

# hits asked of the index per wanted reply: some are skipped (too long, echoing the user)
SEARCH_MARGIN = 3


def load_index(bot_dir: Path | None, explicit: str | Path | None, tokenizer) -> RetrievalIndex | None:
    """The index `explicit` names, else BOT_DIR/retrieval when there is one, else None. A damaged index or one
    built with another tokenizer is a UserError naming its file, never a traceback later."""
    if explicit is not None:
        return RetrievalIndex.load(explicit, tokenizer)
    if bot_dir is not None and (Path(bot_dir) / RETRIEVAL_DIR).exists():
        return RetrievalIndex.load(Path(bot_dir) / RETRIEVAL_DIR, tokenizer)
    return None


def pick_hits(index: RetrievalIndex, context: Sequence[Sequence[int]], last_text: str, k: int,
              max_length: int, notices: list[str]) -> list[Hit]:
    """The `k` most similar pairs' replies for a context (token ids, oldest first), skipping replies longer
    than `max_length` tokens (what a sampled reply may have) and replies that only echo the user's latest
    message (`only_echoes`). Fewer than `k` found: a notice says how many and why."""
    chosen: list[Hit] = []
    too_long = echoes = 0
    for pair, similarity in index.ranked(context, k * SEARCH_MARGIN + 5):
        if len(chosen) == k:
            break
        if index.reply_length(pair) > max_length:
            too_long += 1
        elif only_echoes(index.reply(pair), last_text):
            echoes += 1
        else:
            chosen.append(index.hit(pair, similarity))   # only the kept hits are built
    if len(chosen) < k:
        why = [f"{n} {what}" for n, what in ((too_long, "over max_length"), (echoes, "echoing your message")) if n]
        notices.append(f"retrieval: {len(chosen)} of {k} human replies found"
                       + (f" ({', '.join(why)} skipped)" if why else " (no more similar pairs)"))
    return chosen


def merge_hits(by_text: dict[str, Candidate], hits: Sequence[Hit], num_context_tokens: int) -> list[Candidate]:
    """Add retrieved replies to the candidates keyed by text: a text also sampled becomes "sampled+retrieved"
    (its scores are the sampled ones'); a new one is a "retrieved" candidate (count 0) whose forward score is
    still to compute. Returns the new ones, in hit order."""
    new = []
    for hit in hits:
        c = by_text.get(hit.text)
        if c is not None:
            if c.similarity is None:
                c.source = "sampled+retrieved" if c.source == "sampled" else f"{c.source}+retrieved"
                c.similarity = hit.similarity
            continue
        c = Candidate(text=hit.text, token_ids=list(hit.reply_ids), forward_logprob=None, backward_logprob=None,
                      num_tokens=len(hit.reply_ids) + 1, num_context_tokens=num_context_tokens, score=0.0,
                      count=0, source="retrieved", similarity=hit.similarity)
        by_text[hit.text] = c
        new.append(c)
    return new
