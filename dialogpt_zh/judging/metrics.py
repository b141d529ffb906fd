"""Evaluation metrics: pure functions over strings and score arrays (no model, no I/O).

Conventions (the CDial-GPT table's):
- ratios are percentages on a 0-100 scale: BLEU, Dist-n, repetition and blandness shares, R10@k and MRR;
- perplexity, entropy (nats) and lengths are in their own units;
- an empty input (no outputs / no cases) gives 0.0, never an exception, so a report can always be written.

Token levels:
- character level: every non-whitespace character is a token (`char_tokens`); BLEU at character level uses
  sacrebleu's `zh` tokenizer, which splits CJK characters apart and keeps runs of Latin letters/digits as
  one token (so "hello" is one token, as a reader would count it);
- word level: jieba segmentation (`word_tokens`, deterministic, default dictionary, whitespace dropped);
  BLEU at word level joins those words by spaces and runs sacrebleu with `tokenize="none"`.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "char_tokens", "word_tokens", "ngrams", "bleu", "distinct", "entropy", "average_length",
    "repeated_ngram_share", "bland_share", "perplexity", "generation_metrics", "true_reply_ranks",
    "rank_metrics", "selection_metrics",
]


# ----------------------------------------------------------------------------------------------- tokens
def char_tokens(text: str) -> list[str]:
    """Characters of `text` without whitespace: the unit of Chinese char-level metrics."""
    return [ch for ch in text if not ch.isspace()]


_jieba = None


def _get_jieba():
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it prints "Building prefix dict..." otherwise
        _jieba = jieba
    return _jieba


def word_tokens(text: str) -> list[str]:
    """jieba words of `text` (precise mode, no HMM for new words: stable across jieba versions/caches)."""
    return [w for w in _get_jieba().lcut(text, HMM=False) if w.strip()]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of a token list (none when it is shorter than n)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------------------------------- BLEU
def bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4, level: str = "char") -> float:
    """Corpus BLEU-`max_order` (0-100) of one hypothesis per reference, via sacrebleu.

    BLEU-n is sacrebleu's corpus BLEU with `max_ngram_order=n`: the brevity penalty times the geometric mean
    of the clipped n-gram precisions of orders 1..n (uniform weights 1/n), counts summed over the corpus.
    Smoothing is sacrebleu's default ("exp"), which only matters when some order has zero matches.
    `level="char"` uses sacrebleu's `zh` tokenizer; `level="word"` uses jieba words (`word_tokens`).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    from sacrebleu.metrics import BLEU

    if level == "char":
        scorer = BLEU(tokenize="zh", max_ngram_order=max_order)
        hyps, refs = list(hypotheses), list(references)
    elif level == "word":
        scorer = BLEU(tokenize="none", max_ngram_order=max_order)
        hyps = [" ".join(word_tokens(h)) for h in hypotheses]
        refs = [" ".join(word_tokens(r)) for r in references]
    else:
        raise ValueError(f"level must be 'char' or 'word', not {level!r}")
    return float(scorer.corpus_score(hyps, [refs]).score)


# ------------------------------------------------------------------------------------------- diversity
def distinct(token_lists: Iterable[Sequence[str]], n: int) -> float:
    """Dist-n (0-100): distinct n-grams / all n-grams, counted over all outputs together (corpus level)."""
    counts: Counter = Counter()
    for tokens in token_lists:
        counts.update(ngrams(tokens, n))
    total = sum(counts.values())
    return 100.0 * len(counts) / total if total else 0.0


def entropy(token_lists: Iterable[Sequence[str]], n: int = 4) -> float:
    """Entropy-n in nats: -sum_g p(g) ln p(g), p(g) = count(g) / all n-grams, over all outputs together.

    This is `calc_entropy` of the DSTC7 / DialoGPT evaluation script (Zhang et al. 2018), natural log.
    """
    counts: Counter = Counter()
    for tokens in token_lists:
        counts.update(ngrams(tokens, n))
    total = sum(counts.values())
    if not total:
        return 0.0
    c = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    return float(-(c / total * (np.log(c) - math.log(total))).sum())


def average_length(token_lists: Iterable[Sequence[str]]) -> float:
    """Mean number of tokens per output (0.0 for no outputs)."""
    lengths = [len(t) for t in token_lists]
    return float(sum(lengths) / len(lengths)) if lengths else 0.0


def repeated_ngram_share(token_lists: Iterable[Sequence[str]], n: int = 3) -> float:
    """Share (0-100) of outputs in which some n-gram occurs at least twice (overlaps count: 哈哈哈哈 repeats 哈哈哈)."""
    flags = []
    for tokens in token_lists:
        grams = ngrams(tokens, n)
        flags.append(len(set(grams)) < len(grams))
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def bland_share(texts: Sequence[str], top: int = 20) -> float:
    """Blandness (0-100): share of outputs equal to one of the `top` most frequent outputs.

    Only outputs produced at least twice can be "frequent" (otherwise, with all-distinct outputs, any 20 of
    them would count); ties at the cut-off are broken by text order so the figure is deterministic.
    Texts are compared after removing whitespace.
    """
    if not texts:
        return 0.0
    keys = ["".join(char_tokens(t)) for t in texts]
    counts = Counter(keys)
    frequent = sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (-counts[k], k))[:top]
    return 100.0 * sum(counts[k] for k in frequent) / len(keys)


# ----------------------------------------------------------------------------------------- perplexity
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list: a value that occurred, no interpolation."""
    ordered = sorted(values)
    # rank ceil(q * n / 100), 1-based (math.ceil, not round(x + 0.5): round() takes half to even)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) / 100) - 1))]


def perplexity(sum_logprobs: Iterable[float], num_tokens: Iterable[int]) -> float:
    """Token-level perplexity exp(-sum of log-probs / sum of tokens) over the whole set (natural log).

    Each reference contributes all its scored tokens (the engine scores reply tokens plus the final [SEP]);
    pooling tokens (not averaging per-reference perplexities) is the usual corpus definition.
    """
    total_lp = 0.0
    total_n = 0
    for lp, n in zip(sum_logprobs, num_tokens):
        total_lp += float(lp)
        total_n += int(n)
    if total_n == 0:
        return 0.0
    return float(math.exp(-total_lp / total_n))


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every reply-quality metric for one decoder's outputs against the references (same order)."""
    chars = [char_tokens(h) for h in hypotheses]
    words = [word_tokens(h) for h in hypotheses]
    return {
        "bleu2": bleu(hypotheses, references, 2, "char"),
        "bleu4": bleu(hypotheses, references, 4, "char"),
        "bleu2_word": bleu(hypotheses, references, 2, "word"),
        "bleu4_word": bleu(hypotheses, references, 4, "word"),
        "dist1": distinct(chars, 1),
        "dist2": distinct(chars, 2),
        "dist1_word": distinct(words, 1),
        "dist2_word": distinct(words, 2),
        "entropy4": entropy(chars, 4),
        "entropy4_word": entropy(words, 4),
        "avg_len": average_length(chars),
        "avg_len_words": average_length(words),
        "repeat3": repeated_ngram_share(chars, 3),
        "bland_top20": bland_share(hypotheses, 20),
    }


# ---------------------------------------------------------------------------------- response selection
def true_reply_ranks(scores: np.ndarray, true_index: int = 0) -> np.ndarray:
    """1-based rank of the true reply in each row of `scores` [..., cases, candidates] (higher = better).

    Ties are pessimistic: every other candidate scoring >= the true reply ranks above it, so a scorer that
    gives everything the same score gets rank = number of candidates, never a lucky rank 1.
    A NaN score counts as the worst possible score. Leading axes (e.g. one per weighting of a sweep) are kept.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 2:
        raise ValueError(f"scores must be [..., cases, candidates], got shape {s.shape}")
    s = np.where(np.isnan(s), -np.inf, s)
    true = s[..., true_index:true_index + 1]
    others = np.delete(s, true_index, axis=-1)
    return 1 + (others >= true).sum(axis=-1)


def rank_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """R10@1, R10@2 and MRR (0-100) of 1-based ranks [..., cases], averaged over the cases (last) axis."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"r10@1": 100.0 * (ranks <= 1).mean(axis=-1),
            "r10@2": 100.0 * (ranks <= 2).mean(axis=-1),
            "mrr": 100.0 * (1.0 / ranks).mean(axis=-1)}


def selection_metrics(scores: np.ndarray, true_index: int = 0) -> dict[str, float]:
    """R10@1, R10@2 and MRR (all 0-100) from per-case candidate scores; see `true_reply_ranks` for ties.

    Rn@k = share of cases whose true reply ranks within the top k among the n candidates of its row.
    MRR = mean of 1 / rank, times 100.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {"r10@1": 0.0, "r10@2": 0.0, "mrr": 0.0}
    if s.ndim != 2:
        raise ValueError(f"scores must be [cases, candidates], got shape {s.shape}")
    return {k: float(v) for k, v in rank_metrics(true_reply_ranks(s, true_index)).items()}
