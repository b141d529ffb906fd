"""Hostile input for the data side (readers -> cleaning -> preprocess -> token store), as a careless or
hostile user would give it: every case ends in a clear `error: file[:line]: message` and exit 2 (or a
clean result), never a traceback, never a lost or half-written file (issue 13)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REPO, build_fixture_store, load_benchmark, read_fixture_sessions

from dialogpt_zh.data.store import TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_directory, clean_stale_temp_dirs
from dialogpt_zh.preprocess import main

CORPUS = FIXTURES / "chitchat_train.txt"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show nothing was touched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run(argv: list, capsys, cwd: Path | None = None) -> tuple[int, str]:
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        code = main([str(a) for a in argv] + ["--no_progress"])
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


@pytest.fixture
def old_store(tmp_path, fixture_tokenizer, fixture_sessions) -> Path:
    """A previous output: a token store that a failed or stopped run must leave exactly as it was."""
    return build_fixture_store(tmp_path / "out", fixture_tokenizer, fixture_sessions)


# ------------------------------------------------------------------ output paths
# (name, setup(tmp) -> (argv, cwd, path that must be untouched or None), exit code, message)

def _other_files(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return [CORPUS, "--output", tmp / "out"], None, tmp / "out"


def _other_files_overwrite(tmp):
    argv, cwd, keep = _other_files(tmp)
    return argv + ["--overwrite"], cwd, keep


def _output_is_input_dir(tmp):
    shutil.copytree(FIXTURES, tmp / "corpus")
    return [tmp / "corpus", "--output", tmp / "corpus", "--overwrite"], None, tmp / "corpus"


def _output_inside_input(tmp):
    shutil.copytree(FIXTURES, tmp / "corpus")
    return [tmp / "corpus", "--output", tmp / "corpus" / "store"], None, tmp / "corpus"


def _output_contains_input(tmp):
    (tmp / "data").mkdir()
    shutil.copy(CORPUS, tmp / "data" / "train.txt")
    return [tmp / "data" / "train.txt", "--output", tmp / "data", "--overwrite"], None, tmp / "data"


def _output_is_input_file(tmp):
    shutil.copy(CORPUS, tmp / "train.txt")
    return [tmp / "train.txt", "--output", tmp / "train.txt", "--overwrite"], None, tmp


def _output_is_vocab(tmp):
    (tmp / "v").mkdir()
    (tmp / "v" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n你\n好\n", encoding="utf-8")
    return [CORPUS, "--vocab", tmp / "v" / "vocab.txt", "--output", tmp / "v", "--overwrite"], None, tmp / "v"


def _output_is_file(tmp):
    (tmp / "out").write_text("a file")
    return [CORPUS, "--output", tmp / "out", "--overwrite"], None, tmp


def _output_is_symlink_to_file(tmp):
    (tmp / "real").write_text("a file")
    (tmp / "out").symlink_to(tmp / "real")
    return [CORPUS, "--output", tmp / "out", "--overwrite"], None, tmp


def _parent_is_file(tmp):
    (tmp / "f").write_text("a file")
    return [CORPUS, "--output", tmp / "f" / "out"], None, tmp


def _output_dot(tmp):
    (tmp / "work").mkdir()
    return [CORPUS, "--output", ".", "--overwrite"], tmp / "work", tmp


def _output_dot_with_input(tmp):
    (tmp / "work").mkdir()
    shutil.copy(CORPUS, tmp / "work" / "train.txt")
    return ["train.txt", "--output", "."], tmp / "work", tmp / "work"


def _output_parent_of_cwd(tmp):
    (tmp / "a" / "b").mkdir(parents=True)
    return [CORPUS, "--output", "..", "--overwrite"], tmp / "a" / "b", tmp


def _store_without_overwrite(tmp):
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    sessions = read_fixture_sessions()
    build_fixture_store(tmp / "out", build_char_tokenizer(count_chars(u for s in sessions for u in s)), sessions)
    return [CORPUS, "--output", tmp / "out"], None, tmp / "out"


OUTPUT_CASES = [
    ("dir with other files", _other_files, "output directory exists; pass --overwrite"),
    ("dir with other files, --overwrite", _other_files_overwrite, "not a token store"),
    ("output is the input directory", _output_is_input_dir, "the output is the input"),
    ("output inside an input", _output_inside_input, "the output is inside the input"),
    ("output contains an input", _output_contains_input, "the output contains the input"),
    ("output is the input file", _output_is_input_file, "the output is the input"),
    ("output holds the --vocab", _output_is_vocab, "contains the --vocab"),
    ("output is a plain file", _output_is_file, "not a directory"),
    ("output is a symlink to a file", _output_is_symlink_to_file, "not a directory"),
    ("parent is a plain file", _parent_is_file, "cannot create the output"),
    ("--output . (empty cwd)", _output_dot, "current directory"),
    ("--output . holding the input", _output_dot_with_input, "contains the input"),
    ("--output .. (a parent of cwd)", _output_parent_of_cwd, "current directory"),
    ("existing store, no --overwrite", _store_without_overwrite, "pass --overwrite"),
]


@pytest.mark.parametrize("setup, message", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_output_paths_refused_before_any_work(tmp_path, capsys, setup, message):
    argv, cwd, keep = setup(tmp_path)
    capsys.readouterr()
    before = tree(keep) if keep is not None else None
    code, err = run(argv, capsys, cwd)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    if keep is not None:
        assert tree(keep) == before  # nothing deleted, replaced or added
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temp store left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = run([CORPUS, "--output", ro / "out"], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "cannot create the output: Permission denied" in err


def test_overwrite_replaces_a_store_and_follows_the_umask(tmp_path, capsys, old_store):
    before = tree(old_store)
    old_umask = os.umask(0o022)
    try:
        code, _ = run([CORPUS, "--output", old_store, "--overwrite"], capsys)
    finally:
        os.umask(old_umask)
    assert code == 0 and tree(old_store) != before
    assert (old_store.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing beside it


# ------------------------------------------------------------------ input text

def _nested_json(tmp):
    (tmp / "deep.json").write_text('[["你好", "好"],\n' + "[" * 100_000 + "]" * 100_000 + "]", encoding="utf-8")
    return [tmp / "deep.json"]


def _nested_json_split_dict(tmp):
    (tmp / "deep.json").write_text('{"train": [\n["a", "b"], ' + "[" * 100_000 + "]" * 100_000 + "]}",
                                   encoding="utf-8")
    return [tmp / "deep.json"]


def _utf16_bom(tmp):
    (tmp / "u16.txt").write_bytes("你好\t好呀\n在吗\t在\n".encode("utf-16"))
    return [tmp / "u16.txt"]


def _utf16le_no_bom(tmp):
    (tmp / "u16.txt").write_bytes("hello\thi there\nhow are you\tfine thanks\n".encode("utf-16-le"))
    return [tmp / "u16.txt"]


def _utf16_forced_format(tmp):
    (tmp / "u16.tsv").write_bytes("你好\t好呀\n".encode("utf-16"))
    return [tmp / "u16.tsv", "--format", "tsv"]


def _utf16_in_directory(tmp):
    (tmp / "d").mkdir()
    shutil.copy(CORPUS, tmp / "d" / "a.txt")
    (tmp / "d" / "b.txt").write_bytes("你好\n好呀\n".encode("utf-16"))
    return [tmp / "d"]


def _vocab_not_utf8(tmp):
    (tmp / "vocab.txt").write_bytes("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n".encode() + "你".encode("gbk") + b"\n")
    return [CORPUS, "--vocab", tmp / "vocab.txt"]


def _blocklist_missing(tmp):
    return [CORPUS, "--blocklist", tmp / "nope.txt"]


def _blocklist_not_utf8(tmp):
    (tmp / "block.txt").write_bytes("坏词\n".encode() + "脏".encode("gbk") + b"\n")
    return [CORPUS, "--blocklist", tmp / "block.txt"]


def _nothing_left(tmp):
    (tmp / "one.tsv").write_text("只有一句\n\t\n", encoding="utf-8")
    return [tmp / "one.tsv"]


INPUT_CASES = [
    ("deeply nested JSON", _nested_json, "deep.json:2: malformed JSON: nested too deeply"),
    ("deeply nested JSON in a dict of splits", _nested_json_split_dict, "deep.json:2: malformed JSON: nested too"),
    ("UTF-16 with BOM", _utf16_bom, "u16.txt: UTF-16 text, not UTF-8"),
    ("UTF-16LE without BOM", _utf16le_no_bom, "u16.txt: UTF-16 text, not UTF-8"),
    ("UTF-16 with --format tsv", _utf16_forced_format, "u16.tsv: UTF-16 text, not UTF-8"),
    ("UTF-16 file in a directory", _utf16_in_directory, "b.txt: UTF-16 text, not UTF-8"),
    ("--vocab not UTF-8", _vocab_not_utf8, "vocab.txt:6: not UTF-8 text"),
    ("--blocklist missing", _blocklist_missing, "nope.txt: blocklist file not found"),
    ("--blocklist not UTF-8", _blocklist_not_utf8, "block.txt:2: not UTF-8 text"),
    ("nothing left after cleaning", _nothing_left, "(sessions read: 1; dropped: session_too_short 1, "
                                                   "turns_in_short_sessions 1)"),
]


@pytest.mark.parametrize("setup, message", [c[1:] for c in INPUT_CASES], ids=[c[0] for c in INPUT_CASES])
def test_bad_input_text_exit_2(tmp_path, capsys, setup, message):
    argv = setup(tmp_path)
    code, err = run(argv + ["--output", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "see the counts above" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_evaluate_reads_nested_json_through_the_same_readers(tmp_path):
    from dialogpt_zh.data.readers import iter_clean_sessions

    _nested_json(tmp_path)
    with pytest.raises(UserError, match="deep.json:2: malformed JSON: nested too deeply"):
        list(iter_clean_sessions(tmp_path / "deep.json"))


def test_ansi_escapes_removed_and_counted(tmp_path):
    from dialogpt_zh.data.readers import iter_clean_sessions

    (tmp_path / "ansi.tsv").write_text("\x1b[31m红色\x1b[0m的字\t\x1b]0;标题\x07你好\x1b[1;32m呀\n", encoding="utf-8")
    c = Counter()
    sessions = list(iter_clean_sessions(tmp_path / "ansi.tsv", counters=c))
    assert [s.turns for s in sessions] == [["红色的字", "你好呀"]]
    assert c["ansi_escapes_removed"] == 4 and c["control_chars_removed"] == 0


def test_big_json_value_is_not_reparsed_per_chunk(tmp_path, monkeypatch):
    """One session of 300k turns (~3 MB): read in a few decodes, not one per 64 KB chunk."""
    import json as json_module

    from dialogpt_zh.data import readers

    path = tmp_path / "big.json"
    path.write_text(json_module.dumps([["你好呀"] * 300_000, ["a", "b"]], ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(readers._JsonStream, "CHUNK", 1 << 16)
    calls = Counter()
    real = json_module.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        calls["raw_decode"] += 1
        return real(self, s, idx)

    monkeypatch.setattr(json_module.JSONDecoder, "raw_decode", counting)
    sessions = [r.turns for cf in readers.scan_input(path).files for r in readers.read_file(cf)]
    assert [len(s) for s in sessions] == [300_000, 2]
    assert calls["raw_decode"] <= 12  # 3 MB / 64 KB = 48 re-parses before


def test_missing_blocklist_fails_when_the_bot_is_made(random_bot_dir, tmp_path, capsys, monkeypatch):
    """interact --blocklist MISSING: an error at start (exit 2), not a message on every line."""
    import io

    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.interact import main as interact_main
    from dialogpt_zh.settings import MMISettings

    with pytest.raises(UserError, match="nope.txt.*blocklist file not found"):
        ChatBot.from_pretrained(random_bot_dir, mmi=MMISettings(blocklist=str(tmp_path / "nope.txt")))
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n吃了吗\n"))
    assert interact_main(["--model", str(random_bot_dir), "--blocklist", str(tmp_path / "nope.txt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("blocklist file not found") == 1
    with pytest.raises(UserError, match="blocklist is a directory, not a file of words"):   # both readers say so
        ChatBot.from_pretrained(random_bot_dir, mmi=MMISettings(blocklist=str(tmp_path)))
    from dialogpt_zh.data.cleaning import load_blocklist

    with pytest.raises(UserError, match="blocklist is a directory"):
        load_blocklist(tmp_path)
    bad = tmp_path / "block.txt"
    bad.write_bytes("\ufeff# words\n坏词\n".encode() + "脏".encode("gbk") + b"\n")
    with pytest.raises(UserError, match="block.txt:3: not UTF-8"):  # the one loader: file:line
        ChatBot.from_pretrained(random_bot_dir, mmi=MMISettings(blocklist=str(bad)))


# ------------------------------------------------------------------ the token store checks itself

def _truncate(path: Path, keep: int = -10) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _edit_manifest(store: Path, **changes) -> None:
    m = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        target = m
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    (store / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _save(path: Path, array) -> None:
    with open(path, "wb") as f:  # np.save(path) would add .npy to a name without it
        np.save(f, array, allow_pickle=True)


def _add_split(store: Path, name: str) -> None:
    """A manifest entry for an empty split `name`, with its (empty) files where that name puts them."""
    m = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    m["store_splits"][name] = {"windows": 0, "utterances": 0, "tokens": 0}
    (store / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    (store / f"{name}.ids.bin").write_bytes(b"")
    _save(store / f"{name}.utt.npy", np.zeros(1, np.int64))
    _save(store / f"{name}.win.npy", np.zeros((0, 2), np.int64))
    _save(store / f"{name}.src.npy", np.zeros(0, "<u2"))


def _npy_header(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite a .npy file's header to claim `shape`, keeping its data."""
    data = np.load(path)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": data.dtype.str, "fortran_order": False, "shape": shape})
        f.write(data.tobytes())


STORE_CASES = [
    ("truncated train.ids.bin", lambda s: _truncate(s / "train.ids.bin"), "train.ids.bin: "),
    ("train.ids.bin too long", lambda s: (s / "train.ids.bin").open("ab").write(b"\0\0"), "train.ids.bin: "),
    ("token id beyond the vocabulary", lambda s: (s / "train.ids.bin").write_bytes(
        b"\xff\xff" * ((s / "train.ids.bin").stat().st_size // 2)), "train.ids.bin: token id 65535"),
    ("truncated utt.npy", lambda s: _truncate(s / "train.utt.npy"), "train.utt.npy: unreadable .npy"),
    ("utt.npy of float64", lambda s: _save(s / "train.utt.npy", np.load(s / "train.utt.npy").astype(np.float64)),
     "train.utt.npy: expected int64"),
    ("utt.npy of int32", lambda s: _save(s / "valid.utt.npy", np.load(s / "valid.utt.npy").astype(np.int32)),
     "valid.utt.npy: expected int64"),
    ("utt.npy offsets past the end", lambda s: _save(s / "train.utt.npy", np.load(s / "train.utt.npy") * 2),
     "train.utt.npy: utterance offsets"),
    ("win.npy window past the end", lambda s: _save(s / "train.win.npy", np.load(s / "train.win.npy") + [[1000, 0]]),
     "train.win.npy: a window lies outside"),
    ("win.npy window whose end wraps past int64", lambda s: _save(s / "train.win.npy", np.concatenate(
        [[[2**63 - 1, 1]], np.load(s / "train.win.npy")[1:]])), "train.win.npy: a window lies outside"),
    ("win.npy with a zero-turn window", lambda s: _save(s / "train.win.npy", np.load(s / "train.win.npy") * [[1, 0]]),
     "train.win.npy: a window lies outside"),
    ("win.npy a pickled object array", lambda s: _save(s / "test.win.npy", np.array([{"x": 1}], dtype=object)),
     "test.win.npy: expected int64 [0, 2], found object [1]"),
    ("utt.npy header claims a huge array", lambda s: _npy_header(s / "train.utt.npy", (10**11,)),
     "train.utt.npy: expected int64 [48], found int64 [100000000000]"),
    ("utt.npy header and manifest claim a huge array", lambda s: (
        _npy_header(s / "train.utt.npy", (10**11,)),
        _edit_manifest(s, **{"store_splits.train.utterances": 10**11 - 1})),
     "bytes of data where [100000000000] int64 take 800,000,000,000"),
    ("win.npy a directory", lambda s: ((s / "train.win.npy").unlink(), (s / "train.win.npy").mkdir()),
     "train.win.npy: expected a file, found a directory"),
    ("ids.bin a directory", lambda s: ((s / "valid.ids.bin").unlink(), (s / "valid.ids.bin").mkdir()),
     "valid.ids.bin: expected a file, found a directory"),
    ("manifest a directory", lambda s: ((s / "manifest.json").unlink(), (s / "manifest.json").mkdir()),
     "manifest.json: expected a file, found a directory"),
    ("win.npy missing", lambda s: (s / "valid.win.npy").unlink(), "valid.win.npy: missing store file"),
    ("manifest not UTF-8", lambda s: (s / "manifest.json").write_bytes(b'{"format": "\xff"}'),
     "manifest.json: manifest is not UTF-8"),
    ("manifest a list", lambda s: (s / "manifest.json").write_text("[1, 2]"), "manifest.json: manifest is not a JSON"),
    ("manifest nested too deeply", lambda s: (s / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
     "manifest.json:1: unreadable manifest: nested too deeply"),
    ("manifest version true", lambda s: _edit_manifest(s, version=True), "(field 'version'): store version True"),
    ("manifest version 1.0", lambda s: _edit_manifest(s, version=1.0), "(field 'version'): store version 1.0"),
    ("manifest vocab_size a string", lambda s: _edit_manifest(s, vocab_size="77"),
     "manifest.json (field 'vocab_size'): expected int, found str"),
    ("manifest dtype float", lambda s: _edit_manifest(s, dtype="<f8"), "(field 'dtype'): dtype '<f8'"),
    ("manifest dtype too wide", lambda s: _edit_manifest(s, dtype="<u4"), "(field 'dtype'): dtype '<u4'"),
    ("manifest special id a string", lambda s: _edit_manifest(s, **{"special_ids.sep": "3"}),
     "(field 'special_ids.sep')"),
    ("manifest count negative", lambda s: _edit_manifest(s, **{"store_splits.train.tokens": -1}),
     "(field 'store_splits.train.tokens')"),
    ("manifest split counts a list", lambda s: _edit_manifest(s, **{"store_splits.valid": [1, 2]}),
     "(field 'store_splits.valid.windows')"),
    ("manifest split named with a path", lambda s: _add_split(s, "../outside"),
     "(field 'store_splits'): split name '../outside'"),
    ("manifest directions a string", lambda s: _edit_manifest(s, directions="forward"), "(field 'directions')"),
    ("manifest sources not a list", lambda s: _edit_manifest(s, sources="fixtures"), "(field 'sources')"),
    ("manifest corpora a number", lambda s: _edit_manifest(s, corpora=5), "(field 'corpora')"),
    ("manifest corpora of strings", lambda s: _edit_manifest(s, corpora=["fixtures"]), "(field 'corpora')"),
    ("manifest corpora source a list", lambda s: _edit_manifest(s, corpora=[{"source": ["a"]}]), "(field 'corpora')"),
    ("manifest config a list", lambda s: _edit_manifest(s, config=[4]), "(field 'config')"),
    ("manifest config.max_repeat a string", lambda s: _edit_manifest(s, config={"max_repeat": "4"}),
     "(field 'config.max_repeat')"),
    ("manifest config.max_repeat huge", lambda s: _edit_manifest(s, config={"max_repeat": 10**30}),
     "(field 'config.max_repeat')"),
    ("manifest config.mask_pii a string", lambda s: _edit_manifest(s, config={"mask_pii": "no"}),
     "(field 'config.mask_pii')"),
    ("src.npy missing", lambda s: (s / "train.src.npy").unlink(), "train.src.npy: missing store file"),
    ("src.npy of int64", lambda s: _save(s / "train.src.npy", np.load(s / "train.src.npy").astype(np.int64)),
     "train.src.npy: expected uint16"),
    ("src.npy names a source the manifest lacks",
     lambda s: _save(s / "valid.src.npy", np.load(s / "valid.src.npy") + 1),
     "valid.src.npy: source index 1"),
]


@pytest.mark.parametrize("damage, message", [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_damaged_store_is_an_error_naming_the_file(tmp_path, fixture_tokenizer, fixture_sessions, damage, message):
    store = build_fixture_store(tmp_path / "store", fixture_tokenizer, fixture_sessions)
    TokenStore(store)  # whole, it opens
    damage(store)
    with pytest.raises(UserError) as e:
        TokenStore(store)
    assert message in str(e.value) and str(store) in str(e.value)


def _foreign_tokenizer(store: Path) -> None:
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    shutil.rmtree(store / "tokenizer")
    build_char_tokenizer(count_chars(["完全不同的词表"])).save_pretrained(str(store / "tokenizer"))


def _swap_cls_sep(store: Path) -> None:
    special = json.loads((store / "manifest.json").read_text(encoding="utf-8"))["special_ids"]
    _edit_manifest(store, **{"special_ids.cls": special["sep"], "special_ids.sep": special["cls"]})


TOKENIZER_CASES = [
    ("vocab_size one more", lambda s: _edit_manifest(
        s, vocab_size=json.loads((s / "manifest.json").read_text())["vocab_size"] + 1), "(field 'vocab_size')"),
    ("a foreign tokenizer", _foreign_tokenizer, "(field 'vocab_size'): the tokenizer in"),
    ("cls and sep swapped", _swap_cls_sep, "(field 'special_ids.cls'): the manifest says"),
]


@pytest.mark.parametrize("damage, message", [c[1:] for c in TOKENIZER_CASES], ids=[c[0] for c in TOKENIZER_CASES])
def test_a_tokenizer_that_disagrees_with_the_manifest_exits_2_in_every_face(tmp_path, capsys, fixture_tokenizer,
                                                                          fixture_sessions, damage, message):
    """The check is the store's (TokenStore.tokenizer): the index built from such a store (or crashed), and a
    swapped [CLS]/[SEP] trained silently."""
    from dialogpt_zh.index import main as index_main
    from dialogpt_zh.train import main as train_main

    store = build_fixture_store(tmp_path / "store", fixture_tokenizer, fixture_sessions)
    damage(store)
    for face, extra in ((index_main, []), (train_main, ["--preset", "tiny", "--device", "cpu"])):
        code = face(["--data", str(store), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and str(store / "manifest.json") in err, err
        assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_file_given_as_the_store_says_so(tmp_path, fixture_store):
    with pytest.raises(UserError, match="manifest.json: expected a token store directory, found a file"):
        TokenStore(fixture_store / "manifest.json")


def _unmappable_file() -> Path | None:
    """A regular file of 4096 bytes that mmap refuses (a sysfs attribute), or None where there is none."""
    for path in sorted(Path("/sys/kernel").glob("**/*"))[:2000]:
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size == 4096:
                return path
    return None


def test_unreadable_store_files_exit_2(tmp_path, fixture_tokenizer, fixture_sessions):
    """Read errors (what chmod 000 gives a user who is not root; tests often run as root, where it does not
    bite) are a UserError naming the file: here through files that fail to read even for root."""
    store = build_fixture_store(tmp_path / "store", fixture_tokenizer, fixture_sessions)
    manifest = (store / "manifest.json").read_text(encoding="utf-8")
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to("/proc/self/mem")  # a regular file; read() fails with EIO
    with pytest.raises(UserError, match=r"manifest.json: cannot read the manifest: Input/output error"):
        TokenStore(store)
    unmappable = _unmappable_file()
    if unmappable is None:
        pytest.skip("no sysfs file to stand for an unreadable S.ids.bin")
    (store / "manifest.json").unlink()
    (store / "manifest.json").write_text(manifest, encoding="utf-8")
    _edit_manifest(store, **{"store_splits.train.tokens": 2048})  # 4096 bytes of uint16
    (store / "train.ids.bin").unlink()
    (store / "train.ids.bin").symlink_to(unmappable)
    with pytest.raises(UserError, match=r"train.ids.bin: cannot read"):
        TokenStore(store)


def test_index_of_an_empty_train_split_exits_2(tmp_path, capsys, fixture_tokenizer, fixture_sessions):
    from dialogpt_zh.index import main as index_main

    store = build_fixture_store(tmp_path / "store", fixture_tokenizer, fixture_sessions[:1])  # a valid session only
    assert index_main(["--data", str(store), "--output", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json (field 'store_splits'): the train split is empty (0 windows)" in err, err
    assert not (tmp_path / "idx").exists()


def test_train_on_a_truncated_store_exits_2(tmp_path, capsys, fixture_tokenizer, fixture_sessions):
    from dialogpt_zh.train import main as train_main

    store = build_fixture_store(tmp_path / "store", fixture_tokenizer, fixture_sessions)
    _truncate(store / "train.ids.bin", 50)
    code = train_main(["--data", str(store), "--output", str(tmp_path / "model"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "train.ids.bin" in err and "truncated" in err
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------ atomic_directory

def test_atomic_directory_refuses_what_it_may_not_replace(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_directory(tmp_path / "file", replace_existing=True):
            pass
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    with pytest.raises(UserError, match="not empty"):
        with atomic_directory(tmp_path / "full"):
            pass
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "a").read_text() == "a"
    with atomic_directory(tmp_path / "empty") as d:  # new: one rename
        (d / "b").write_text("b")
    assert (tmp_path / "empty" / "b").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    from dialogpt_zh import fsutil

    if not exchange:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final, replace_existing=True) as d:
            (d / "new").write_text("half")
            raise RuntimeError("the work failed")
    assert tree(final) == {"old": b"old"}
    with atomic_directory(final, replace_existing=True) as d:
        assert tree(final) == {"old": b"old"}  # the old output is intact until the new one is complete
        (d / "new").write_text("new")
    assert tree(final) == {"new": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_rename_failure_is_a_user_error(tmp_path, monkeypatch):
    """--output . used to fail with EBUSY at the very end and leave the complete temp store behind."""
    import errno

    from dialogpt_zh import fsutil

    def busy(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(a))

    monkeypatch.setattr(fsutil.os, "rename", busy)
    with pytest.raises(UserError, match="cannot put the output in place: Device or resource busy"):
        with atomic_directory(tmp_path / "out") as d:
            (d / "big").write_bytes(b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dirs_only_ours_and_only_dead(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "manifest.json").write_text("{}")
    dead, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".out.tmp-{dead}-0123abcd"
    running = tmp_path / f".out.tmp-{alive}-0123abcd"
    lookalikes = [tmp_path / f".out.tmp-{dead}-notours", tmp_path / f".other.tmp-{dead}-0123abcd",
                  tmp_path / f"out.tmp-{dead}-0123abcd"]
    for d in [stale, running, *lookalikes]:
        d.mkdir()
        (d / "f").write_text("x")
    (tmp_path / f".out.tmp-{dead}-fedcba98").write_text("a file, not a directory")
    assert clean_stale_temp_dirs(final) == [stale]
    assert not stale.exists() and running.exists() and all(d.exists() for d in lookalikes)
    # the previous output moved aside by a run killed between its two renames is put back
    shutil.move(final, tmp_path / f".out.old-{dead}")
    clean_stale_temp_dirs(final)
    assert (final / "manifest.json").read_text() == "{}"


# ------------------------------------------------------------------ signals

def _signal_case(tmp_path: Path, sig: int, old_store: Path) -> tuple[subprocess.CompletedProcess, list[Path]]:
    """Start `preprocess --overwrite` on a corpus big enough to take a few seconds, wait until it is writing
    its temp store, then send `sig`."""
    big = tmp_path / "big.tsv"
    with open(big, "w", encoding="utf-8") as f:
        for i in range(150_000):
            f.write(f"第{i}句话说了什么\t回答第{i}句的话\t再说一句{i % 977}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dialogpt_zh.preprocess", str(big), "--output", str(old_store),
                             "--overwrite", "--no_progress", "--workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while not temps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        temps = [p for p in tmp_path.glob(".out.tmp-*") if (p / "sessions.tmp").exists()]
    assert temps, f"the run never started writing: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), temps


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_stopped_run_cleans_up_and_keeps_the_old_store(tmp_path, old_store, sig, code, message):
    before = tree(old_store)
    r, _ = _signal_case(tmp_path, sig, old_store)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "is as it was" in r.stderr and "Traceback" not in r.stderr
    assert tree(old_store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tsv", "out"]  # no temp directory left


@pytest.mark.slow
def test_killed_run_litter_is_cleaned_by_the_next_run(tmp_path, old_store):
    before = tree(old_store)
    r, temps = _signal_case(tmp_path, signal.SIGKILL, old_store)
    assert r.returncode == -signal.SIGKILL
    assert tree(old_store) == before and all(t.exists() for t in temps)  # kill -9 cannot clean up
    assert main([str(CORPUS), "--output", str(old_store), "--overwrite", "--no_progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tsv", "out"]
    TokenStore(old_store)


def _write_big_corpus(path: Path, lines: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(f"第{i}句话说了什么\t回答第{i}句的话\t再说一句{i % 977}\n")
    return path


@pytest.mark.slow
def test_a_stop_at_any_moment_ends_the_run_and_leaves_no_temp_dir(tmp_path, old_store):
    """SIGTERM (and Ctrl-C) to `preprocess --workers 2` at many moments of a run, on a loaded machine (a busy
    process beside it): every run ends (no hang: multiprocessing.Pool's terminate once waited forever
    here), no temp directory is left, and the output is either the old store untouched (stopped, 143/130) or
    a complete new one (the stop came while it was being put in place: the run finishes, 0; or once the
    interpreter was exiting, past our handlers: killed by the signal itself)."""
    big = _write_big_corpus(tmp_path / "big.tsv", 20_000)
    out = old_store
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dialogpt_zh.preprocess", str(big), "--output", str(out), "--overwrite",
            "--no_progress", "--workers", "2"]

    def start_and_wait_for_temp_dir() -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        return proc

    def finish(proc: subprocess.Popen) -> tuple[int, str]:
        try:
            _, err = proc.communicate(timeout=120)  # a hang guard, not a speed limit
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("preprocess did not end after the stop signal")
        return proc.returncode, err

    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]
    try:
        proc = start_and_wait_for_temp_dir()   # one whole run: how long the part worth stopping in takes
        t0 = time.monotonic()
        code, err = finish(proc)
        span = time.monotonic() - t0
        assert code == 0, err
        outcomes = []
        for i in range(8):
            sig = signal.SIGINT if i % 4 == 3 else signal.SIGTERM
            before = tree(out)
            proc = start_and_wait_for_temp_dir()
            time.sleep(span * i / 7)                  # from the temp dir's creation to the end of the run
            if proc.poll() is None:
                proc.send_signal(sig)
            code, err = finish(proc)
            outcomes.append(code)
            assert "Traceback" not in err, err
            assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tsv", "out"], (i, code)  # no temp dir
            if code in (0, -sig):   # finished: the stop came while finishing (0) or as the interpreter exited
                TokenStore(out)                       # complete
            else:
                assert code == (130 if sig == signal.SIGINT else 143), (i, err)
                assert tree(out) == before, i         # untouched
    finally:
        for p in load:
            p.kill()
            p.wait()
    assert outcomes.count(143) + outcomes.count(130) >= 4, outcomes   # most stops landed inside the run


def test_worker_pool_keeps_order_and_a_stop_kills_its_workers():
    """The pool gives the inline results in input order; an exception in the body (what a stop signal is)
    leaves no worker alive, however many units are still queued or being sent."""
    from dialogpt_zh.data.cleaning import CleaningOptions
    from dialogpt_zh.data.pool import InlinePool, WorkerPool, clean_batches, ordered_map

    sessions = [[f"第{i}句", f"回答{i}", "好的" * (i % 5)] for i in range(9_000)]
    units = [(0, clean_batches(sessions[i:i + 1500]), [None] * len(sessions[i:i + 1500]))
             for i in range(0, len(sessions), 1500)]
    options = CleaningOptions()
    inline = list(ordered_map(InlinePool(options), iter(units), 1))
    with WorkerPool(2, options) as pool:
        assert list(ordered_map(pool, iter(units), 2)) == inline
        procs = list(pool._procs)
    assert all(p.exitcode is not None for p in procs)

    with pytest.raises(KeyboardInterrupt):
        with WorkerPool(2, options) as pool:
            procs = list(pool._procs)
            for _, batches, _ in units * 4:           # more than the workers take: queued and being sent
                pool.submit(batches)
            raise KeyboardInterrupt
    assert all(p.exitcode is not None for p in procs)


# ------------------------------------------------------------------ the throughput benchmark's --workdir

@pytest.mark.parametrize("workdir_exists", [True, False], ids=["given workdir", "new workdir"])
def test_benchmark_deletes_only_what_it_created(tmp_path, monkeypatch, capsys, workdir_exists):
    """It used to `rm -rf --workdir`. (Each preprocess run is replaced by writing a store-sized file where the
    benchmark's run would write its store: what is measured does not matter here, what is deleted does.)"""
    bench = load_benchmark("preprocess_throughput", monkeypatch)
    runs = []

    def fake_run(inputs, output, workers=0):
        output.mkdir(parents=True)
        (output / "train.ids.bin").write_bytes(b"\0" * 100)
        runs.append(output)
        return {"input_mb": 1.0, "chars": 1, "wall_s": 1.0, "cpu_s": 1.0, "chars_per_s": 1.0, "peak_rss_mb": 1.0,
                "windows": 1, "command": "x", "load_after": 0.0}

    monkeypatch.setattr(bench, "run", fake_run)
    corpus = tmp_path / "corpus"
    for name in bench.SOURCES:
        (corpus / name).mkdir(parents=True)
        shutil.copy(CORPUS, corpus / name / "train.txt")
    work = tmp_path / "work"
    if workdir_exists:
        work.mkdir()
        (work / "precious.txt").write_text("keep me")
    monkeypatch.setattr(sys, "argv", ["preprocess_throughput.py", "--corpus", str(corpus), "--workdir", str(work),
                                      "--synthetic_mb", "1"])
    bench.main()
    assert "shared corpus w=0" in capsys.readouterr().out and len(runs) == 2
    assert all(work in r.parents for r in runs)
    if workdir_exists:
        assert [p.name for p in work.iterdir()] == ["precious.txt"]
    else:
        assert not work.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_swallowed_stop_signal_is_not_lost(sig, code):
    """A signal whose exception lands in an interpreter callback (e.g. logging's after-fork hook while the
    worker pool forks: seen once in CI, where preprocess then finished and exited 0) is only printed as
    "Exception ignored"; the run must still stop at its next check instead of committing its output."""
    from dialogpt_zh import cli

    reached = []

    def body() -> int:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # what "Exception ignored in ..." amounts to
        cli.raise_if_stopped()
        reached.append("past the check")
        return 0

    assert cli.run_main(body) == code
    assert not reached


@pytest.mark.parametrize("output,words", [("-", "got '-'"), ("", "got ''"), ("store\nx", "control character '\\n'"),
                                          ("store\tx", "control character '\\t'")])
def test_output_names_that_are_no_file_name_are_refused(tmp_path, capsys, monkeypatch, output, words):
    """"-" became a store directory named "-" in the current directory, a newline a directory whose name the
    summary split over two lines; the shared check (fsutil.check_output_name) refuses both, naming the flag."""
    from dialogpt_zh.fsutil import check_output_file

    monkeypatch.chdir(tmp_path)
    assert main([str(FIXTURES / "lccc_pairs.tsv"), "--output", output, "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output: ") and words in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="^report: ") as e:  # the faces' output files: the same check
        check_output_file(output, field="report")
    assert words in str(e.value)
