"""Normaliser and session cleaning: each rule, its counter, and properties (hypothesis)."""
from __future__ import annotations

import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialogpt_zh.data.cleaning import (
    EMAIL_PLACEHOLDER,
    ID_CARD_PLACEHOLDER,
    PHONE_PLACEHOLDER,
    CleaningOptions,
    clean_session,
    is_char_split,
    join_char_split,
    load_blocklist,
    normalize_counted,
    normalize_text,
)
from dialogpt_zh.errors import UserError


def test_char_split_lines_are_joined():
    assert normalize_text("今 天 好 ， h e l l o") == "今天好,hello"  # NFKC turns ， into ,
    assert normalize_text("我 用 S E E D . 2 4 小 时") == "我用SEED.24小时"


def test_real_spaces_are_kept():
    assert normalize_text("你看过Breaking Bad吗？") == "你看过Breaking Bad吗?"
    assert normalize_text("好看，Jack 和 Rose 的故事") == "好看,Jack 和 Rose 的故事"
    assert normalize_text("I am a boy") == "I am a boy"
    # subtitles: clause gaps are real (not char-split) and are collapsed to one space
    assert normalize_text("爸爸  你去哪儿了") == "爸爸 你去哪儿了"


def test_char_split_detection():
    assert is_char_split("你 好")
    assert is_char_split("今 天 天 气 不 错 ， h e l l o")
    assert not is_char_split("Breaking Bad")
    assert not is_char_split("你好")
    assert not is_char_split("a b c Breaking Bad")


def test_nfkc_control_and_whitespace():
    c = Counter()
    assert normalize_counted("ＡＢＣ１２３\u200b\x07 \t\n 你好\u3000呀", c) == "ABC123 你好 呀"
    assert c["nfkc_changed"] == 1 and c["control_chars_removed"] == 1


def test_urls_and_placeholders_dropped():
    c = Counter()
    assert normalize_counted("看 这 个 _url_", c) == "看这个"
    assert normalize_counted("官网 http://www.example.com/a?b=1 看看", c) == "官网 看看"
    assert normalize_counted("去www.example.com看看", c) == "去看看"
    # a char-split URL is only recognisable after joining
    assert normalize_counted("链 接 h t t p : / / x . c n", c) == "链接"
    assert c["url_removed"] == 4


def test_repeat_capped_but_not_digits():
    c = Counter()
    assert normalize_counted("哈哈哈哈哈哈哈哈", c) == "哈哈哈哈"
    assert normalize_counted("哈 哈 哈 哈 哈 哈", c) == "哈哈哈哈"
    assert normalize_counted("好！！！！！！！", c) == "好!!!!"
    assert normalize_counted("一共1000000元", c) == "一共1000000元"
    assert c["repeat_capped"] == 3
    assert normalize_counted("哈哈哈哈哈哈", max_repeat=2) == "哈哈"


def test_pii_masked():
    c = Counter()
    assert normalize_counted("电话 1 3 8 0 0 1 3 8 0 0 0", c) == "电话" + PHONE_PLACEHOLDER
    assert normalize_counted("打+86 13912345678或010-12345678", c) == f"打{PHONE_PLACEHOLDER}或{PHONE_PLACEHOLDER}"
    assert normalize_counted("邮箱是 bryan@example.com 吗", c) == f"邮箱是 {EMAIL_PLACEHOLDER} 吗"
    assert normalize_counted("身份证11010519491231002X号", c) == f"身份证{ID_CARD_PLACEHOLDER}号"
    assert c["pii_phone_masked"] == 3 and c["pii_email_masked"] == 1 and c["pii_id_card_masked"] == 1
    # numbers that are not personal data stay
    assert normalize_text("2008年1月20日,票价120元,订单12345") == "2008年1月20日,票价120元,订单12345"
    assert normalize_text("13800138000", ) == PHONE_PLACEHOLDER
    assert normalize_counted("13800138000", mask_pii=False) == "13800138000"


def test_placeholders_are_stable_and_tokenize_without_unk():
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars, encode

    for p in (EMAIL_PLACEHOLDER, ID_CARD_PLACEHOLDER, PHONE_PLACEHOLDER):
        assert normalize_text(p) == p
    text = normalize_text("我的电话是13800138000,邮箱a@b.cn")
    tok = build_char_tokenizer(count_chars([text]))
    ids = encode(tok, text)
    assert tok.unk_token_id not in ids
    assert len(ids) == len(text)


def test_ordinary_chinese_tokenizes_without_unk(shared_corpus):
    """The gpt2-chitchat vocab and a char vocab built from the corpus both cover everyday Chinese."""
    from dialogpt_zh.tokenizer import encode, load_vocab_tokenizer

    tok = load_vocab_tokenizer(shared_corpus / "vocab" / "gpt2-chitchat-vocab.txt")
    for text in ["你好,今天天气真不错,我们去公园散步吧!", "我明天要去北京出差,大概三天后回来。"]:
        ids = encode(tok, normalize_text(text))
        assert ids and tok.unk_token_id not in ids


def test_session_split_at_empty_and_short_dropped():
    c = Counter()
    out = clean_session(["第 一 句", "第 二 句", "", "第 四 句", "  ", "第 六 句", "第 七 句"], counters=c)
    assert out == [["第一句", "第二句"], ["第六句", "第七句"]]
    assert c["utterance_empty_dropped"] == 2
    assert c["session_split_at_empty"] == 2
    assert c["session_too_short"] == 1 and c["turns_in_short_sessions"] == 1


def test_truncation_blocklist_and_non_text():
    c = Counter()
    opts = CleaningOptions(max_utterance_chars=5, blocklist=["坏 词"])  # the blocklist is normalised too
    assert clean_session(["一二三四五六七", "好的"], opts, c) == [["一二三四五", "好的"]]
    assert c["utterance_truncated"] == 1
    assert clean_session(["这是坏词", "嗯"], opts, c) == []
    assert c["session_blocklisted"] == 1
    assert clean_session(["好", None, "嗯"], CleaningOptions(), c) == []
    assert c["utterance_not_text"] == 1


def test_load_blocklist(tmp_path):
    p = tmp_path / "block.txt"
    p.write_text("# comment\n坏词\n\n脏话\n", encoding="utf-8")
    assert load_blocklist(p) == ["坏词", "脏话"]
    with pytest.raises(UserError, match="not found"):
        load_blocklist(tmp_path / "missing.txt")
    p.write_bytes("坏词\n".encode("gbk"))
    with pytest.raises(UserError, match=r"block.txt:1: not UTF-8"):
        load_blocklist(p)


def test_options_validated():
    with pytest.raises(UserError, match="max_utterance_chars"):
        CleaningOptions(max_utterance_chars=0)


CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
MIXED = st.one_of(CJK, st.sampled_from(list(" 　\t\n，。！？,.!?@:/_0123456789abcXYZ哈【】\u200b\u0301")))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_never_crashes_and_is_idempotent(text):
    once = normalize_text(text)
    assert isinstance(once, str)
    assert normalize_text(once) == once
    assert "\n" not in once and "\t" not in once and once == once.strip()


@settings(max_examples=300, deadline=None)
@given(st.text(MIXED, max_size=60))
def test_normalize_idempotent_on_corpus_like_text(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(CJK, min_size=1, max_size=4), min_size=1, max_size=12),
       st.lists(st.sampled_from([" ", "  ", "\u3000"]), min_size=12, max_size=12))
def test_space_rule_loses_no_cjk_character(words, gaps):
    text = "".join(w + g for w, g in zip(words, gaps)).strip()
    joined = join_char_split(" ".join(text.split()))
    assert joined.replace(" ", "") == "".join(words)
    # the whole normaliser keeps every CJK character too (a run may be capped, never removed entirely)
    out = normalize_text(text)
    assert set("".join(words)) == set(out.replace(" ", ""))
    assert unicodedata.is_normalized("NFKC", out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(), st.text(MIXED, max_size=40)), max_size=12))
def test_batch_normaliser_equals_one_by_one(texts):
    """The preprocessor cleans in batches; the chat engine one utterance at a time: same result."""
    from dialogpt_zh.data.cleaning import normalize_many

    assert normalize_many(texts) == [normalize_text(t) for t in texts]
    c1, c2 = Counter(), Counter()
    normalize_many(texts, c1)
    for t in texts:
        normalize_counted(t, c2)
    assert +c1 == +c2
