"""Metric code against values worked out by hand (the arithmetic is in the comments)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dialogpt_zh.judging import metrics as M


# ------------------------------------------------------------------------------------------------ BLEU
def test_bleu_char_level_equal_length():
    # hyp 今 天 天 气 很 好 / ref 今 天 天 气 不 错 (6 chars each, BP = 1)
    # 1-grams: 今 天 天 气 match -> 4/6; 2-grams: 今天 天天 天气 match of 5 -> 3/5
    # 3-grams: 今天天 天天气 of 4 -> 2/4;    4-grams: 今天天气 of 3 -> 1/3
    # BLEU-2 = sqrt(4/6 * 3/5) = sqrt(0.4) = 0.632456
    # BLEU-4 = (4/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/15) ** 0.25 = 0.508133
    assert M.bleu(["今天天气很好"], ["今天天气不错"], 2) == pytest.approx(63.2456, abs=1e-3)
    assert M.bleu(["今天天气很好"], ["今天天气不错"], 4) == pytest.approx(50.8133, abs=1e-3)


def test_bleu_brevity_penalty():
    # hyp 今 天 好 (3) / ref 今 天 天 气 好 (5): BP = exp(1 - 5/3) = 0.513417
    # 1-grams 3/3; 2-grams 今天 天好 vs 今天 天天 天气 气好 -> 1/2
    # BLEU-2 = 0.513417 * sqrt(1 * 0.5) = 0.363041
    assert M.bleu(["今天好"], ["今天天气好"], 2) == pytest.approx(36.3041, abs=1e-3)


def test_bleu_pools_counts_over_the_corpus():
    # the two pairs above: 1-grams (4+3)/(6+3) = 7/9, 2-grams (3+1)/(5+2) = 4/7,
    # hyp len 9, ref len 11 -> BP = exp(1 - 11/9) = 0.800737
    # BLEU-2 = 0.800737 * sqrt(7/9 * 4/7) = 0.800737 * 2/3 = 0.533825  (not the mean of 63.25 and 36.30)
    got = M.bleu(["今天天气很好", "今天好"], ["今天天气不错", "今天天气好"], 2)
    assert got == pytest.approx(53.3825, abs=1e-3)


def test_bleu_word_level_uses_jieba_words():
    # jieba: 我 / 喜欢 / 吃 / 苹果 vs 我 / 喜欢 / 吃 / 香蕉
    assert M.word_tokens("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]
    # 1-grams 3/4, 2-grams (我 喜欢)(喜欢 吃) of 3 -> 2/3, BP = 1: BLEU-2 = sqrt(1/2) = 0.707107
    assert M.bleu(["我喜欢吃苹果"], ["我喜欢吃香蕉"], 2, "word") == pytest.approx(70.7107, abs=1e-3)
    # char level differs: 1-grams 4/6, 2-grams 我喜 喜欢 欢吃 of 5 -> 3/5: sqrt(0.4)
    assert M.bleu(["我喜欢吃苹果"], ["我喜欢吃香蕉"], 2, "char") == pytest.approx(63.2456, abs=1e-3)


def test_bleu_identical_is_100_and_empty_is_0():
    assert M.bleu(["你好呀朋友"], ["你好呀朋友"], 4) == pytest.approx(100.0)
    assert M.bleu([], [], 4) == 0.0
    assert M.bleu([""], ["你好"], 2) == 0.0
    with pytest.raises(ValueError):
        M.bleu(["a"], [], 2)


# ------------------------------------------------------------------------------------------- diversity
def test_distinct():
    chars = [M.char_tokens("哈哈哈"), M.char_tokens("你 好")]  # whitespace is not a token
    # 1-grams: 哈 哈 哈 你 好 = 5, distinct 3 -> 60
    assert M.distinct(chars, 1) == pytest.approx(60.0)
    # 2-grams: 哈哈 哈哈 你好 = 3, distinct 2 -> 66.667 (n-grams never cross outputs)
    assert M.distinct(chars, 2) == pytest.approx(200 / 3)
    assert M.distinct([], 1) == 0.0
    assert M.distinct([["a"]], 2) == 0.0  # no bigram at all


def test_entropy4():
    # 4-grams of "abcde" and "abcd": abcd, bcde, abcd -> p = 2/3, 1/3
    # H = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.270310 + 0.366204 = 0.636514 nats
    toks = [M.char_tokens("abcde"), M.char_tokens("abcd")]
    assert M.entropy(toks, 4) == pytest.approx(0.636514, abs=1e-6)
    # a single n-gram type has zero entropy; nothing to count -> 0
    assert M.entropy([list("abcd"), list("abcd")], 4) == 0.0
    assert M.entropy([list("abc")], 4) == 0.0
    # 4 equally frequent 1-grams -> ln 4
    assert M.entropy([list("abcd")], 1) == pytest.approx(math.log(4))


def test_average_length():
    assert M.average_length([list("你好"), list("再见了吗")]) == 3.0
    assert M.average_length([]) == 0.0


def test_repeated_ngram_share():
    outs = ["哈哈哈哈",    # 哈哈哈 twice (overlapping) -> repeats
            "哈哈哈",      # one trigram -> no
            "你好你好你",  # 你好你, 好你好, 你好你 -> repeats
            "abcabc"]      # abc, bca, cab, abc -> repeats
    assert M.repeated_ngram_share([M.char_tokens(o) for o in outs], 3) == pytest.approx(75.0)
    assert M.repeated_ngram_share([], 3) == 0.0


def test_bland_share():
    outs = ["好的", "好的", "好的", "嗯", "嗯", "你好", "再见"]
    # frequent (>= 2): 好的 x3, 嗯 x2. top 1 -> 3/7; top 20 -> 5/7
    assert M.bland_share(outs, top=1) == pytest.approx(300 / 7)
    assert M.bland_share(outs, top=20) == pytest.approx(500 / 7)
    # all distinct: nothing is frequent, even though there are fewer than 20 outputs
    assert M.bland_share(["一", "二", "三"]) == 0.0
    assert M.bland_share([]) == 0.0
    # a tie at the cut-off: only one of the two equally frequent replies counts -> 2/4
    assert M.bland_share(["乙", "乙", "甲", "甲"], top=1) == pytest.approx(50.0)


def test_perplexity():
    # (-2 - 4) over 2 + 2 tokens: exp(6 / 4) = exp(1.5) = 4.481689 (pooled, not the mean of exp(1), exp(2))
    assert M.perplexity([-2.0, -4.0], [2, 2]) == pytest.approx(4.481689, abs=1e-6)
    assert M.perplexity([], []) == 0.0


def test_generation_metrics_keys_and_single_case():
    got = M.generation_metrics(["你好"], ["你好"])
    assert got["bleu2"] == pytest.approx(100.0)
    assert got["dist1"] == pytest.approx(100.0) and got["dist2"] == pytest.approx(100.0)
    assert got["avg_len"] == 2.0 and got["avg_len_words"] == 1.0
    assert got["repeat3"] == 0.0 and got["bland_top20"] == 0.0
    empty = M.generation_metrics([], [])
    assert set(empty) == set(got) and all(v == 0.0 for v in empty.values())


# ---------------------------------------------------------------------------------- response selection
def test_selection_metrics_hand_computed():
    scores = np.array([[5, 1, 2],   # true best -> rank 1
                       [2, 3, 1],   # one above -> rank 2
                       [1, 1, 0],   # tie with one -> pessimistic rank 2
                       [0, 1, 2]])  # last -> rank 3
    assert M.true_reply_ranks(scores).tolist() == [1, 2, 2, 3]
    got = M.selection_metrics(scores)
    # R@1 = 1/4, R@2 = 3/4, MRR = (1 + 1/2 + 1/2 + 1/3) / 4 = 0.583333
    assert got["r10@1"] == pytest.approx(25.0)
    assert got["r10@2"] == pytest.approx(75.0)
    assert got["mrr"] == pytest.approx(58.3333, abs=1e-3)


def test_selection_ties_and_nan_are_pessimistic():
    # a constant scorer must not look perfect: rank = number of candidates
    assert M.true_reply_ranks(np.zeros((2, 10))).tolist() == [10, 10]
    assert M.true_reply_ranks(np.array([[np.nan, -5.0, -6.0]])).tolist() == [3]
    # true index elsewhere
    assert M.true_reply_ranks(np.array([[1.0, 3.0, 2.0]]), true_index=2).tolist() == [2]
    assert M.selection_metrics(np.zeros((0, 10))) == {"r10@1": 0.0, "r10@2": 0.0, "mrr": 0.0}
    single = M.selection_metrics(np.array([[1.0, 0.5] + [0.0] * 8]))
    assert single == {"r10@1": 100.0, "r10@2": 100.0, "mrr": 100.0}


def test_percentile_is_nearest_rank():
    """The load benchmarks' percentile: the smallest value with at least q % of the values at or below it."""
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [M.percentile(values, q) for q in (0, 20, 21, 50, 80, 95, 100)] == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0]
    assert M.percentile([7.0], 95) == 7.0
    assert M.percentile(list(range(1, 101)), 95) == 95
