"""What a reply call returns: `Reply` and its ranked `Candidate`s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# the start of every notice saying that older utterances were left out of the context (a face may word these
# its own way, e.g. once per conversation)
HISTORY_NOTICE_PREFIX = "history: "


@dataclass
class Candidate:
    """One candidate reply with its scores. `rank` 1 is the chosen reply."""

    text: str
    token_ids: list[int]
    # log P(reply tokens + final [SEP] | context), summed; None for a retrieved reply when the ranking does not
    # read the forward term (forward_weight 0, the default)
    forward_logprob: float | None
    backward_logprob: float | None    # log P(context tokens | reply), summed; None when MMI is off
    num_tokens: int                   # reply tokens + the final [SEP]
    num_context_tokens: int           # context tokens scored by the backward model (each turn + its [SEP])
    score: float
    rank: int = 0
    count: int = 1                    # how many of the N samples produced this text (0: retrieved only)
    source: str = "sampled"           # "sampled", "retrieved", "sampled+retrieved" (both), or "given" (rerank)
    similarity: float | None = None   # the retrieval similarity (cosine, 0..1); None when not retrieved


@dataclass
class Reply:
    text: str
    candidates: list[Candidate]
    latency_s: float
    timings: dict[str, float]
    mmi: bool
    notices: list[str]
    seed: int | None = None           # the seed used: pass it back to reproduce this reply exactly
    context: list[str] = dataclasses.field(default_factory=list)  # the utterances the model saw
    threads: int = 0                  # intra-op threads this reply ran with (bot.thread_policy); 0 = not known
    batch_size: int = 1               # requests computed in the same batch as this one (reply_many)
    # how the candidates' scores were computed (settings.mmi_score): the (forward, backward, length) weights
    # and the normalisation, so a face can show the formula beside the scores
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    normalize: str = "mean"
    retrieved_bonus: float = 0.0      # added to the score of a reply retrieved from the index
