"""Chat-messages readers (OpenAI / ShareGPT, JSON and JSON Lines), .gz / .zip input, corpus licences."""
from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import zipfile
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialogpt_zh.data.cleaning import clean_sessions
from dialogpt_zh.data.pipeline import PreprocessArguments, run_preprocess
from dialogpt_zh.data.readers import (
    chat_turns,
    corpus_licence,
    iter_clean_sessions,
    read_file,
    recognise_licence,
    scan_input,
    sniff_format,
)
from dialogpt_zh.errors import UserError
from dialogpt_zh.preprocess import main

FIXTURES = Path(__file__).resolve().parent.parent / "corpus" / "fixtures"
ALL_FIXTURES = ["lccc_pairs.tsv", "lccc_toy_valid.txt", "lccc_splits.json", "lccc_list.json", "kdconv_dev.json",
                "chatterbot.yml", "subtitles.conv", "chitchat_crlf.txt", "chitchat_train.txt",
                "chat_messages.jsonl", "chat_sharegpt.json"]


def raw(path: Path, fmt: str = "auto", counters: Counter | None = None):
    scan = scan_input(path, fmt)
    return [(r.turns, r.line, r.split) for cf in scan.files for r in read_file(cf, counters)]


def gzip_copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


# ------------------------------------------------------------------ chat messages

def test_chat_jsonl_turns_and_counted_policy():
    c = Counter()
    sessions = raw(FIXTURES / "chat_messages.jsonl", counters=c)
    assert sessions == [
        (["你好呀", "你好!今天过得怎么样?", "还不错,刚下班"], 1, None),  # the system message is not a turn
        (["最近总是失眠", "听起来你很辛苦,能说说是从什么时候开始的吗?"], 2, None),  # client/counselor are speakers
        (["周末去哪玩", "", "去爬山吧", "好主意"], 4, None),  # empty text kept here: cleaning splits there
        (["看看 这张图", None, "天黑了", "没有角色的一句"], 5, None),  # text parts joined; null -> None; tool left out
        ([None, None, "在吗", "在的"], 8, None),  # a non-object message and a number content -> None
    ]
    assert (c["message_system_skipped"], c["message_tool_skipped"], c["message_role_unknown"],
            c["message_role_missing"], c["record_malformed"], c["record_no_turns"]) == (2, 1, 1, 1, 1, 1)
    c = Counter()
    cleaned = [s.turns for s in iter_clean_sessions(FIXTURES / "chat_messages.jsonl", counters=c)]
    assert ["去爬山吧", "好主意"] in cleaned and ["在吗", "在的"] in cleaned and ["天黑了", "没有角色的一句"] in cleaned
    assert c["utterance_not_text"] == 3 and c["utterance_empty_dropped"] == 4  # not-text turns are empty too


def test_sharegpt_json_list():
    c = Counter()
    sessions = raw(FIXTURES / "chat_sharegpt.json", counters=c)
    assert sessions == [(["今天好冷啊", "是啊,记得多穿点衣服", "嗯嗯,谢谢"], 2, None),
                        (["你喜欢什么电影", "我喜欢看喜剧片"], 8, None),
                        (["晚安", "晚安,好梦"], 13, None)]  # an OpenAI-style record in the same list
    assert c["record_malformed"] == 1 and c["message_system_skipped"] == 1


def test_openai_json_dict_of_splits_and_forced_format(tmp_path):
    conv = lambda a, b: {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}  # noqa
    p = tmp_path / "chat.json"
    p.write_text(json.dumps({"train": [conv("你好", "你好呀")], "valid": [conv("早", "早上好")]},
                            ensure_ascii=False), encoding="utf-8")
    assert sniff_format(p) == "chat-json"
    assert [(s[0], s[2]) for s in raw(p)] == [(["你好", "你好呀"], "train"), (["早", "早上好"], "valid")]
    # JSON Lines under a .json name, and a forced format on an unknown extension
    q = tmp_path / "lines.json"
    q.write_text("\n".join(json.dumps(conv(a, b), ensure_ascii=False) for a, b in [("在吗", "在"), ("吃了吗", "吃了")]),
                 encoding="utf-8")
    assert sniff_format(q) == "chat-jsonl"
    assert [s[0] for s in raw(q)] == [["在吗", "在"], ["吃了吗", "吃了"]]
    r = tmp_path / "export.dat"
    shutil.copy(q, r)
    assert [s[0] for s in raw(r, fmt="chat-jsonl")] == [["在吗", "在"], ["吃了吗", "吃了"]]
    # KdConv stays KdConv although its records also have "messages"
    assert sniff_format(FIXTURES / "kdconv_dev.json") == "kdconv-json"


def test_malformed_jsonl_line_is_fatal_with_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"messages": []}\n\n{"messages": [{"role": "user", "content": "半句\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.jsonl:3: malformed JSON Lines record") as e:
        list(iter_clean_sessions(p))
    assert e.value.line == 3
    p.write_bytes('{"messages": [{"role": "user", "content": "好"}]}\n'.encode() + "坏".encode("gbk") + b"\n")
    with pytest.raises(UserError, match=r"broken.jsonl:2: not UTF-8"):
        list(iter_clean_sessions(p))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.sampled_from(["role", "from", "content", "value", "text", "type",
                                                              "messages", "conversations"]), children, max_size=4),
                           max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_chat_turns_never_crash(record):
    c = Counter()
    turns = chat_turns(record, c)
    assert turns is None or all(t is None or isinstance(t, str) for t in turns)
    if turns is not None:
        for piece in clean_sessions([turns], None, c)[0]:
            assert len(piece) >= 2 and all(isinstance(t, str) and t for t in piece)


# ------------------------------------------------------------------ .gz and .zip

@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_gz_reads_like_the_plain_file(tmp_path, name):
    gz = gzip_copy(FIXTURES / name, tmp_path / (name + ".gz"))
    assert sniff_format(gz, explicit_only=True) == sniff_format(FIXTURES / name, explicit_only=True)
    c_plain, c_gz = Counter(), Counter()
    assert raw(gz, counters=c_gz) == raw(FIXTURES / name, counters=c_plain)
    assert c_gz == c_plain


def test_zip_members_are_files_named_archive_member(tmp_path):
    z = tmp_path / "bundle.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(FIXTURES / "lccc_toy_valid.txt", "lccc/toy_valid.txt")
        zf.write(FIXTURES / "chat_sharegpt.json", "chat/data.json")
        zf.writestr("chat/test.jsonl.gz", gzip.compress((FIXTURES / "chat_messages.jsonl").read_bytes()))
        zf.writestr("README.md", "# not a corpus file")
        zf.writestr("chat/", "")  # a directory entry
    scan = scan_input(z)
    assert [(f.name, f.format, f.split) for f in scan.files] == [
        (f"{z}:lccc/toy_valid.txt", "tsv", "valid"), (f"{z}:chat/data.json", "chat-json", None),
        (f"{z}:chat/test.jsonl.gz", "chat-jsonl", "test")]
    assert scan.skipped == [f"{z}:README.md"]
    sessions = list(iter_clean_sessions(z))
    assert sessions[0].path == f"{z}:lccc/toy_valid.txt" and sessions[0].split == "valid"
    assert {s.path for s in sessions} == {f.name for f in scan.files}
    assert ["今天好冷啊", "是啊,记得多穿点衣服", "嗯嗯,谢谢"] in [s.turns for s in sessions]


def test_directory_picks_up_gz_and_zip(tmp_path):
    gzip_copy(FIXTURES / "chitchat_train.txt", tmp_path / "train.txt.gz")
    gzip_copy(FIXTURES / "lccc_splits.json", tmp_path / "data.json.gz")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.write(FIXTURES / "subtitles.conv", "subtitles.conv")
    (tmp_path / "notes.txt.bz2").write_bytes(b"BZh9")
    scan = scan_input(tmp_path)
    assert [(Path(f.name).name, f.format, f.split) for f in scan.files] == [
        ("data.json.gz", "lccc-json", None), ("more.zip:subtitles.conv", "conv", None),
        ("train.txt.gz", "chitchat", "train")]
    assert [Path(s).name for s in scan.skipped] == ["notes.txt.bz2"]


def test_corrupt_archives_are_user_errors_naming_the_file(tmp_path):
    data = gzip.compress((FIXTURES / "chat_messages.jsonl").read_bytes() * 50)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: corrupt or truncated compressed data"):
        list(iter_clean_sessions(truncated))
    garbled = tmp_path / "garbled.txt.gz"
    garbled.write_bytes(data[:20] + bytes(b ^ 0x5A for b in data[20:60]) + data[60:])
    with pytest.raises(UserError, match=r"garbled.txt.gz: corrupt or truncated"):
        list(iter_clean_sessions(garbled))
    not_gzip = tmp_path / "plain.tsv.gz"
    not_gzip.write_text("你好\t你好呀\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"plain.tsv.gz: corrupt or truncated"):
        list(iter_clean_sessions(not_gzip))
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"bad.zip: not a readable zip archive"):
        scan_input(bad_zip)
    only_other = tmp_path / "pictures.zip"
    with zipfile.ZipFile(only_other, "w") as zf:
        zf.writestr("cat.png", b"\x89PNG")
    with pytest.raises(UserError, match=r"pictures.zip: archive holds no corpus files \(skipped: .*cat.png"):
        scan_input(only_other)
    tar = tmp_path / "corpus.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(FIXTURES / "lccc_pairs.tsv", "pairs.tsv")
    with pytest.raises(UserError, match=r"corpus.tar.gz: cannot tell the corpus format.*tar archives are not read"):
        scan_input(tar)
    # a member whose compressed bytes are damaged (the CRC check catches it)
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zf:
        zf.write(FIXTURES / "lccc_pairs.tsv", "pairs.tsv")
    body = bytearray(damaged.read_bytes())
    at = body.index("天".encode("utf-8"))
    body[at:at + 3] = "地".encode("utf-8")
    damaged.write_bytes(bytes(body))
    with pytest.raises(UserError, match=r"damaged.zip:pairs.tsv: corrupt or truncated .*CRC"):
        list(iter_clean_sessions(damaged))


def test_cli_truncated_archive_exit_2_no_output(tmp_path, capsys):
    data = gzip.compress((FIXTURES / "chitchat_train.txt").read_bytes() * 200)
    p = tmp_path / "train.txt.gz"
    p.write_bytes(data[:-30])
    out = tmp_path / "store"
    assert main([str(p), "--output", str(out), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {p}: corrupt or truncated" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".store*"))


# ------------------------------------------------------------------ preprocess: held-out names, corpora

def test_preprocess_archives_holdout_and_corpora_licences(tmp_path):
    mit = tmp_path / "mit"
    mit.mkdir()
    (mit / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person",
                                 encoding="utf-8")
    gzip_copy(FIXTURES / "lccc_toy_valid.txt", mit / "valid.txt.gz")
    gzip_copy(FIXTURES / "chitchat_train.txt", mit / "train.txt.gz")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "COPYING").write_text("Do what you like, but be kind.", encoding="utf-8")
    with zipfile.ZipFile(odd / "chat.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(FIXTURES / "chat_sharegpt.json", "sharegpt/test.json")
        zf.write(FIXTURES / "chat_messages.jsonl", "messages.jsonl")
    bare = tmp_path / "bare"
    bare.mkdir()
    gzip_copy(FIXTURES / "lccc_splits.json", bare / "data.json.gz")
    inputs = [mit, odd / "chat.zip", bare / "data.json.gz"]
    m = run_preprocess(PreprocessArguments(output=str(tmp_path / "store"), progress=False, valid_ratio=0.0,
                                           test_ratio=0.0, holdout_source_splits="valid,test"), inputs)
    by = m["cleaning"]["by_source"]
    assert by["mit"]["session_held_out"] == 2  # valid.txt.gz: its own split, seen through the .gz
    assert by["chat.zip"]["session_held_out"] == 3  # chat.zip:sharegpt/test.json
    assert by["data.json.gz"]["session_held_out"] == 1  # the "valid" key inside the gz'd JSON
    assert by["chat.zip"]["message_system_skipped"] == 3 and "message_system_skipped" in m["cleaning"]["drop_reasons"]
    assert m["counts"]["by_source"]["chat.zip"]["train"]["sessions"] == 5  # from messages.jsonl
    files = [f["path"] for f in m["inputs"][1]["files"]]
    assert files == [f"{odd / 'chat.zip'}:sharegpt/test.json", f"{odd / 'chat.zip'}:messages.jsonl"]
    assert m["corpora"] == [
        {"source": "mit", "path": str(mit), "licence": "MIT", "licence_file": str(mit / "LICENSE")},
        {"source": "chat.zip", "path": str(odd / "chat.zip"), "licence": "unrecognised licence file: COPYING",
         "licence_file": str(odd / "COPYING")},
        {"source": "data.json.gz", "path": str(bare / "data.json.gz"), "licence": "none stated",
         "licence_file": None}]
    assert m["sources"] == ["mit", "chat.zip", "data.json.gz"]
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["corpora"] == m["corpora"]


@pytest.mark.parametrize("text, spdx", [
    ("MIT License\n\nCopyright (c) 2020 x\n\nPermission is hereby granted, free of charge, to any", "MIT"),
    ("                                 Apache License\n"
     "                           Version 2.0, January 2004", "Apache-2.0"),
    ("Redistribution and use in source and binary forms, with or without modification ... 3. Neither the name "
     "of the copyright holder", "BSD-3-Clause"),
    ("Redistribution and use in source and binary forms, with or without\nmodification, are permitted",
     "BSD-2-Clause"),
    ("Creative Commons Legal Code\n\nCC0 1.0 Universal", "CC0-1.0"),
    ("Attribution-ShareAlike 4.0 International\n\n=====", "CC-BY-SA-4.0"),
    ("GNU LESSER GENERAL PUBLIC LICENSE\n Version 3, 29 June 2007 ... GNU General Public License", "LGPL-3.0"),
    ("                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007", "GPL-3.0"),
    ("// SPDX-License-Identifier: MPL-2.0\n", "MPL-2.0"),
    ("All rights reserved. Ask us first.", None),
])
def test_recognise_licence(text, spdx):
    assert recognise_licence(text) == spdx


def test_corpus_licence_file_names(tmp_path):
    assert corpus_licence(tmp_path) == ("none stated", None)
    (tmp_path / "data.txt").write_text("你好\n你好呀\n", encoding="utf-8")
    (tmp_path / "License.md").write_text("Creative Commons\nCC0 1.0 Universal\n", encoding="utf-8")
    assert corpus_licence(tmp_path / "data.txt") == ("CC0-1.0", str(tmp_path / "License.md"))


# ------------------------------------------------------------------ the real chat-messages corpus

@pytest.mark.corpus
def test_smile_jsonl_gz_first_conversations(shared_corpus):
    path = shared_corpus / "smile" / "smile.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    scan = scan_input(path)
    assert [f.format for f in scan.files] == ["chat-jsonl"] and scan.licence == "CC0-1.0"
    c = Counter()
    sessions = list(islice(iter_clean_sessions(path, counters=c), 300))  # a generator: reads one block, not 177 MB
    assert len(sessions) == 300 and sessions[0].line == 1 and sessions[0].path == str(path)
    assert all(len(s.turns) >= 2 and all(s.turns) for s in sessions)
    assert [s.line for s in sessions] == sorted(s.line for s in sessions)
    assert sessions[0].turns[0].startswith("高三后的迷茫")
    # client / counselor are known speakers; no record of the first block is malformed
    assert not (c["message_role_unknown"] or c["message_role_missing"] or c["record_malformed"])
    assert c["sessions_read"] <= 2000
