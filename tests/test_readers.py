"""Corpus readers: every format on hand-written fixtures, detection, directories, bad input."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialogpt_zh.data.readers import (
    CorpusFile,
    iter_clean_sessions,
    read_file,
    scan_input,
    sniff_format,
    split_from_name,
)
from dialogpt_zh.errors import UserError

FIXTURES = Path(__file__).resolve().parent.parent / "corpus" / "fixtures"
MINE = ["lccc_pairs.tsv", "lccc_toy_valid.txt", "lccc_splits.json", "lccc_list.json", "kdconv_dev.json",
        "chatterbot.yml", "subtitles.conv", "chitchat_crlf.txt", "chitchat_train.txt"]


def raw(name: str, fmt: str = "auto", counters: Counter | None = None):
    scan = scan_input(FIXTURES / name, fmt)
    return [(r.turns, r.line, r.split) for cf in scan.files for r in read_file(cf, counters)]


@pytest.mark.parametrize("name, fmt", [
    ("lccc_pairs.tsv", "tsv"), ("lccc_toy_valid.txt", "tsv"), ("lccc_splits.json", "lccc-json"),
    ("lccc_list.json", "lccc-json"), ("kdconv_dev.json", "kdconv-json"), ("chatterbot.yml", "chatterbot-yaml"),
    ("subtitles.conv", "conv"), ("chitchat_crlf.txt", "chitchat"), ("chitchat_train.txt", "chitchat")])
def test_auto_detection(name, fmt):
    assert sniff_format(FIXTURES / name, explicit_only=True) == fmt


def test_chitchat_crlf():
    assert raw("chitchat_crlf.txt") == [(["你好", "你好呀", "在干嘛"], 1, None), (["下雨了", "记得带伞"], 5, None)]


def test_tsv_lines_and_split_from_name():
    sessions = raw("lccc_pairs.tsv")
    assert sessions[0] == (["今 天 天 气 不 错 ， h e l l o", "是 啊 ， 出 去 走 走 吧"], 1, None)
    assert [s[1] for s in sessions] == [1, 2, 3, 4, 5, 6, 8]  # the blank line 7 is no session
    assert {s[2] for s in raw("lccc_toy_valid.txt")} == {"valid"}


def test_lccc_json_splits_and_malformed_record():
    sessions = raw("lccc_splits.json")
    assert [(s[2], len(s[0])) for s in sessions] == [("train", 3), ("train", 2), ("valid", 2)]
    assert sessions[0][1] == 3  # line where the session starts
    c = Counter()
    assert [s[0] for s in raw("lccc_list.json", counters=c)] == \
        [["早 上 好", "早 ！ 吃 了 吗"], ["晚 安", "晚 安 ， 好 梦"]]
    assert c["record_malformed"] == 1


def test_kdconv_messages_attrs_ignored_split_from_file_name():
    sessions = raw("kdconv_dev.json")
    assert sessions[0][0][0] == "你看过Breaking Bad吗？"
    assert len(sessions[0][0]) == 6 and all(isinstance(t, str) for t in sessions[0][0])
    assert {s[2] for s in sessions} == {"dev"}


def test_chatterbot_yaml_lines_and_scalars_as_text():
    sessions = raw("chatterbot.yml")
    assert [s[1] for s in sessions] == [4, 6, 10]
    assert sessions[2][0] == ["123", "这是一个数字"]


def test_conv_sessions_crlf_and_stray_lines():
    c = Counter()
    sessions = raw("subtitles.conv", counters=c)
    assert sessions[0] == (["爸爸  你去哪儿了", "我去买菜了", "买了什么"], 2, None)
    assert sessions[1][0] == ["你好", "你好啊", "", "刚才说到哪了", "说到吃饭"]
    assert sessions[2][0] == ["只有一句"]
    assert c["line_malformed"] == 1


def test_clean_sessions_contract():
    c = Counter()
    out = list(iter_clean_sessions([FIXTURES / "subtitles.conv", FIXTURES / "kdconv_dev.json"], counters=c))
    assert [s.turns for s in out[:3]] == [["爸爸 你去哪儿了", "我去买菜了", "买了什么"], ["你好", "你好啊"],
                                          ["刚才说到哪了", "说到吃饭"]]
    assert out[0].source == "subtitles.conv" and out[0].path.endswith("subtitles.conv") and out[0].line == 2
    assert out[1].line == out[2].line == 6  # split at the empty utterance, same origin
    kd = [s for s in out if s.source == "kdconv_dev.json"]
    assert kd[0].split == "dev" and "Breaking Bad" in kd[0].turns[0]
    assert "【邮箱】" in kd[0].turns[3]
    assert c["session_split_at_empty"] == 1 and c["session_too_short"] == 1


def test_directory_walk_sorted_and_unknown_files_reported(tmp_path):
    for name in ["chatterbot.yml", "lccc_pairs.tsv", "subtitles.conv"]:
        shutil.copy(FIXTURES / name, tmp_path / name)
    (tmp_path / "sub").mkdir()
    shutil.copy(FIXTURES / "kdconv_dev.json", tmp_path / "sub" / "dev.json")
    (tmp_path / "LICENSE").write_text("MIT")
    (tmp_path / "notes.md").write_text("# notes")
    scan = scan_input(tmp_path)
    assert [f.path.name for f in scan.files] == ["chatterbot.yml", "lccc_pairs.tsv", "subtitles.conv", "dev.json"]
    assert [f.format for f in scan.files] == ["chatterbot-yaml", "tsv", "conv", "kdconv-json"]
    assert sorted(Path(p).name for p in scan.skipped) == ["LICENSE", "notes.md"]
    assert scan.source == tmp_path.name
    c = Counter()
    sessions = list(iter_clean_sessions(tmp_path, counters=c))
    assert c["files_skipped"] == 2 and sessions


def test_explicit_format_override(tmp_path):
    p = tmp_path / "pairs.dat"
    p.write_text("你 好\t你 好 呀\n", encoding="utf-8")
    assert [s.turns for s in iter_clean_sessions(p, fmt="tsv")] == [["你好", "你好呀"]]
    # a .txt with TABs read as chitchat when asked: one utterance per line (the TAB is just a space)
    assert [s.turns for s in iter_clean_sessions(FIXTURES / "lccc_toy_valid.txt", fmt="chitchat")] == \
        [["你吃饭了吗吃了,你呢", "周末去哪儿玩去爬山吧"]]


def test_split_from_name():
    assert split_from_name(Path("toy_train.txt")) == "train"
    assert split_from_name(Path("dev.json")) == "dev"
    assert split_from_name(Path("contest.json")) is None


# ------------------------------------------------------------------ bad input

def test_missing_path():
    with pytest.raises(UserError, match="no such file"):
        scan_input("/nonexistent/corpus.txt")


def test_directory_without_corpus_files(tmp_path):
    (tmp_path / "LICENSE").write_text("MIT")
    with pytest.raises(UserError, match="no corpus files"):
        scan_input(tmp_path)


def test_unknown_format(tmp_path):
    with pytest.raises(UserError, match="unknown format"):
        scan_input(FIXTURES / "lccc_pairs.tsv", fmt="csv")
    p = tmp_path / "blob.bin"
    p.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(UserError, match="cannot tell the corpus format"):
        scan_input(p)


@pytest.mark.parametrize("suffix", [".txt", ".tsv", ".conv", ".json", ".yml"])
def test_undecodable_bytes_name_file_and_line(tmp_path, suffix):
    p = tmp_path / f"bad{suffix}"
    body = {".json": '[["你好", "好"],\n ["坏', ".yml": "conversations:\n- - 你好\n  - 坏"}.get(suffix, "你好\t好\n坏")
    tail = {".json": '"]]\n', ".yml": "\n"}.get(suffix, "\n")
    p.write_bytes(body.encode("utf-8") + "字".encode("gbk") + tail.encode())
    fmt = {".txt": "tsv", ".conv": "tsv"}.get(suffix, "auto")
    with pytest.raises(UserError, match=rf"bad{suffix}:\d+: not UTF-8") as e:
        list(iter_clean_sessions(p, fmt=fmt))
    assert e.value.line == (2 if suffix != ".yml" else 3)


def test_malformed_json_names_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n ["你好", "好"],\n ["缺", "逗号"]\n ["x"]\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.json:4: malformed JSON") as e:
        list(iter_clean_sessions(p))
    assert e.value.line == 4
    p.write_text('{"train": 5}', encoding="utf-8")
    with pytest.raises(UserError, match="expected a list of sessions"):
        list(iter_clean_sessions(p))


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "broken.yml"
    p.write_text("conversations:\n- - 你好\n  - [未闭合\n- - 好\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.yml:\d+: malformed YAML"):
        list(iter_clean_sessions(p))
    p.write_text("categories:\n- x\n", encoding="utf-8")
    with pytest.raises(UserError, match="no `conversations:` list"):
        list(iter_clean_sessions(p))


def test_json_streaming_across_chunks(tmp_path, monkeypatch):
    """Sessions that straddle the parser's read chunks are decoded whole, with the right line numbers."""
    from dialogpt_zh.data import readers

    monkeypatch.setattr(readers._JsonStream, "CHUNK", 7)
    sessions = [[f"第{i}句", "回复" * (i % 5 + 1)] for i in range(50)]
    p = tmp_path / "many.json"
    p.write_text("\ufeff" + json.dumps({"train": sessions[:30], "test": sessions[30:]}, ensure_ascii=False, indent=1),
                 encoding="utf-8")
    got = [(r.turns, r.split, r.line) for r in read_file(CorpusFile(p, "lccc-json", "s", None))]
    assert [g[0] for g in got] == sessions
    assert [g[1] for g in got] == ["train"] * 30 + ["test"] * 20
    lines = p.read_text(encoding="utf-8").splitlines()
    assert all(lines[g[2] - 1].strip() == "[" for g in got)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.text(max_size=20), max_size=5), max_size=8))
def test_readers_never_crash_on_arbitrary_text(tmp_path_factory, sessions):
    d = tmp_path_factory.mktemp("prop")
    (d / "a.json").write_text(json.dumps(sessions, ensure_ascii=False), encoding="utf-8")
    (d / "b.tsv").write_text("".join("\t".join(t.replace("\n", " ").replace("\r", " ") for t in s) + "\n"
                                     for s in sessions), encoding="utf-8")
    (d / "c.txt").write_text("\n\n".join("\n".join(t for t in s) for s in sessions), encoding="utf-8")
    c = Counter()
    for name, fmt in (("a.json", "lccc-json"), ("b.tsv", "tsv"), ("c.txt", "chitchat")):
        for s in iter_clean_sessions(d / name, fmt=fmt, counters=c):
            assert len(s.turns) >= 2 and all(t and t == t.strip() for t in s.turns)
    kept_from_json = list(iter_clean_sessions(d / "a.json", fmt="lccc-json"))
    assert len(kept_from_json) <= sum(len(s) for s in sessions)
