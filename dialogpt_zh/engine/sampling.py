"""Logits filters for sampling one token per row: plain functions over a (rows, vocab) tensor.

The engine's decoding loop calls them in this order (the order of Hugging Face's logits processors):
repetition penalty -> bans (special tokens, too-short [SEP], repeated n-grams) -> temperature -> top-k -> top-p
-> sample. Every filter returns a new tensor (or edits one the caller owns) and never touches global RNG state.
"""
from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the reply: positive logits divided, negative multiplied.

    `history` is a (rows, steps) tensor of the tokens generated so far in each row (None before the first);
    only those entries are touched (a gather/scatter, not a pass over the whole vocabulary).
    """
    if penalty == 1.0 or history is None or history.shape[1] == 0:
        return logits
    picked = logits.gather(1, history)
    logits = logits.clone()
    logits.scatter_(1, history, torch.where(picked > 0, picked / penalty, picked * penalty))
    return logits


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already present in `tokens` (the reply so far)."""
    if n <= 0 or len(tokens) < n - 1:
        return []
    if n == 1:
        return list(set(tokens))
    prefix = tuple(tokens[len(tokens) - (n - 1):])
    banned = []
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i:i + n - 1]) == prefix:
            banned.append(tokens[i + n - 1])
    return banned


def ban_repeated_ngrams(logits: torch.Tensor, rows_tokens: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already in that row's reply."""
    if n <= 0:
        return logits
    for row, tokens in enumerate(rows_tokens):
        banned = banned_ngram_tokens(tokens, n)
        if banned:
            logits[row, banned] = NEG_INF
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (k <= 0: no filtering)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p (p >= 1: no filtering).

    The most likely token is always kept, so a row never ends up empty.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row: greedy when temperature == 0, else temperature + top-k + top-p sampling.

    With top-k the draw is made among the k survivors only (torch.multinomial over the whole vocabulary
    costs milliseconds per step on CPU); without it, by an exponential race over the full distribution
    (argmax p / E with E ~ Exp(1) is an exact sample), both from the caller's generator.
    """
    return sample_rows(logits, temperature, top_k, top_p, [(logits.shape[0], generator)])


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                draws: Sequence[tuple[int, torch.Generator | None]]) -> torch.Tensor:
    """`sample_tokens` for consecutive groups of rows with the same settings but their own generators:
    `draws` = [(rows, generator), ...] in row order. The filters run once over all rows; each group's
    random draws come from its own generator, so a group gets exactly what it gets sampled alone."""
    if temperature == 0:
        return logits.argmax(dim=-1)

    def per_group(values: torch.Tensor, draw) -> torch.Tensor:
        """`draw(rows, generator)` for each group's rows of `values`, concatenated in row order."""
        if len(draws) == 1:
            return draw(values, draws[0][1])
        parts = values.split([n for n, _ in draws])
        return torch.cat([draw(part, g) for part, (_, g) in zip(parts, draws)])

    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)   # sorted, so top-p applies directly
        probs = torch.softmax(top_p_filter(values, top_p), dim=-1)
        choice = per_group(probs, lambda p, g: torch.multinomial(p, 1, generator=g))
        return indices.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(top_p_filter(logits, top_p), dim=-1)
    race = per_group(probs, lambda p, g: torch.empty_like(p).exponential_(1.0, generator=g))
    return (probs / race).argmax(dim=-1)
