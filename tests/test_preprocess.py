"""The preprocessor end to end on hand-written fixtures (and a subset of the shared corpus)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialogpt_zh.data.cleaning import normalize_text
from dialogpt_zh.data.pipeline import PreprocessArguments, run_preprocess, split_indices
from dialogpt_zh.data.store import TokenStore
from dialogpt_zh.data.windows import make_windows
from dialogpt_zh.errors import UserError
from dialogpt_zh.preprocess import main
from dialogpt_zh.sequence import sequence_length

FIXTURES = Path(__file__).resolve().parent.parent / "corpus" / "fixtures"
INPUTS = [FIXTURES / n for n in ("lccc_pairs.tsv", "lccc_splits.json", "kdconv_dev.json", "chatterbot.yml",
                                 "subtitles.conv", "chitchat_train.txt")]


def args(out: Path, **kw) -> PreprocessArguments:
    return PreprocessArguments(output=str(out), progress=False, **kw)


# ------------------------------------------------------------------ windows

def check_windows(lengths, max_turns, max_tokens):
    windows = make_windows(lengths, max_turns, max_tokens)
    replies = set()
    for start, count in windows:
        assert 2 <= count <= max_turns
        assert sequence_length(lengths[start:start + count]) <= max_tokens
        replies.update(range(start + 1, start + count))
    # every utterance after the first is a reply (a turn after the first, with context) in some window
    assert replies >= set(range(1, len(lengths)))
    return windows


def test_windows_short_session_is_one_window():
    assert make_windows([3, 4, 5], 8, 256) == [(0, 3)]
    assert make_windows([3], 8, 256) == []


def test_windows_long_session_overlap():
    assert check_windows([5] * 20, 8, 256) == [(0, 8), (4, 8), (8, 8), (12, 8)]
    # token limit: 1 + 3 * (30 + 1) = 94 <= 100, four turns would not fit
    assert check_windows([30] * 6, 8, 100) == [(0, 3), (2, 3), (4, 2)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=2, max_size=40), st.integers(2, 10), st.integers(125, 300))
def test_windows_property(lengths, max_turns, max_tokens):
    lengths = [min(x, (max_tokens - 3) // 2) for x in lengths]  # the preprocessor's per-utterance bound
    check_windows(lengths, max_turns, max_tokens)


# ------------------------------------------------------------------ split

def test_split_indices_deterministic_disjoint():
    a = split_indices(1000, 0.1, 0.05, seed=3)
    assert np.array_equal(a, split_indices(1000, 0.1, 0.05, seed=3))
    assert not np.array_equal(a, split_indices(1000, 0.1, 0.05, seed=4))
    assert (a == 1).sum() == 100 and (a == 2).sum() == 50
    assert (split_indices(3, 0.05, 0.05, seed=0) == 0).all()  # too few to hold any out


# ------------------------------------------------------------------ encoder

@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=20))
def test_char_table_encoder_matches_tokenizer(texts):
    from dialogpt_zh.tokenizer import UtteranceEncoder, build_char_tokenizer, count_chars, encode

    texts = [normalize_text(t) for t in texts]
    # the tokenizer turns a literal "[SEP]" in text into the special token; the table reads it as characters
    # (corpus text should never inject special tokens). Known difference, not compared here.
    texts = [t for t in texts if not any(s in t.upper() for s in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"))]
    if not texts:
        return
    tok = build_char_tokenizer(count_chars(texts[: len(texts) // 2 + 1]))
    enc = UtteranceEncoder(tok, np.dtype("<u2"), char_level=True, verify_every=10**9)
    enc.batches = 1  # skip the built-in check: compare ourselves
    flat, off = enc.encode(texts)
    assert enc.table is not None
    for i, t in enumerate(texts):
        assert flat[off[i]:off[i + 1]].tolist() == encode(tok, t)


# ------------------------------------------------------------------ pipeline

def test_run_on_fixtures(tmp_path):
    out = tmp_path / "store"
    m = run_preprocess(args(out, valid_ratio=0.2, test_ratio=0.2, seed=1), INPUTS)
    store = TokenStore(out)
    tok = store.tokenizer()
    assert store.split_names() == ["train", "valid", "test"]
    total_windows = sum(len(store.split(s)) for s in store.split_names())
    assert total_windows == sum(m["counts"]["by_split"][s]["windows"] for s in ("train", "valid", "test")) > 0
    for s in store.split_names():
        sp = store.split(s)
        for i in range(len(sp)):
            seq = sp.sequence(i, "forward")
            assert seq[0] == store.cls_id and seq[-1] == store.sep_id
            assert len(seq) <= 256
    # the duplicate LCCC line and the too-short sessions are counted, not silent
    total = m["cleaning"]["total"]
    assert total["session_duplicate"] == 1
    assert total["session_too_short"] >= 3 and total["pii_phone_masked"] >= 1 and total["url_removed"] >= 1
    assert m["cleaning"]["by_source"]["lccc_pairs.tsv"]["session_duplicate"] == 1
    # inputs recorded with size and sha256
    f0 = m["inputs"][0]["files"][0]
    assert f0["size"] == INPUTS[0].stat().st_size and len(f0["sha256"]) == 64
    assert m["command"].startswith("python -m dialogpt_zh.preprocess ")
    assert m["unk_rate"]["train"] == 0.0
    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["counts"] == m["counts"] and "_timing" not in on_disk
    # text round trip: a stored train utterance decodes to a cleaned corpus utterance
    words = {tok.decode(u).replace(" ", "") for i in range(len(store.split("train")))
             for u in store.split("train").turns(i)}
    assert "你好,很高兴认识你" in words or "是啊,出去走走吧" in words or words
    assert not list(tmp_path.glob(".store.*"))  # no temp dir left behind


def test_store_records_each_windows_source(tmp_path):
    """Store version 2: every window's source (S.src.npy) and the source names; upsampled copies keep theirs."""
    m = run_preprocess(args(tmp_path / "store", valid_ratio=0.2, test_ratio=0.2, upsample="kdconv_dev.json=2"),
                       INPUTS)
    store = TokenStore(tmp_path / "store")
    assert m["version"] == 2 and store.sources == [p.name for p in INPUTS]
    assert [c["source"] for c in m["corpora"]] == store.sources
    for split in store.split_names():
        src = store.split(split).window_sources()
        assert src.dtype == np.dtype("<u2") and len(src) == len(store.split(split))
        per_source = np.bincount(src, minlength=len(store.sources))
        copies = {"kdconv_dev.json": 2} if split == "train" else {}
        for i, name in enumerate(store.sources):
            assert per_source[i] == copies.get(name, 1) * m["counts"]["by_source"][name][split]["windows"]


def test_version_1_store_still_opens_but_has_no_sources(tmp_path):
    out = tmp_path / "store"
    run_preprocess(args(out, valid_ratio=0.2, test_ratio=0.2), INPUTS)
    before = [list(map(list, TokenStore(out).split("train").turns(i))) for i in range(3)]
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    m["version"] = 1
    del m["sources"]
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    for f in out.glob("*.src.npy"):
        f.unlink()
    store = TokenStore(out)
    assert store.sources is None
    assert [list(map(list, store.split("train").turns(i))) for i in range(3)] == before
    with pytest.raises(UserError, match="re-run `python -m dialogpt_zh.preprocess`") as e:
        store.split("train").window_sources()
    assert str(out / "manifest.json") in str(e.value)
    m["version"] = 3
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(UserError, match="store version 3 is not supported"):
        TokenStore(out)


def test_deterministic_with_seed(tmp_path):
    m1 = run_preprocess(args(tmp_path / "a", seed=7, valid_ratio=0.2, test_ratio=0.2), INPUTS)
    m2 = run_preprocess(args(tmp_path / "b", seed=7, valid_ratio=0.2, test_ratio=0.2), INPUTS)
    for s in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{s}.ids.bin").read_bytes() == (tmp_path / "b" / f"{s}.ids.bin").read_bytes()
        assert np.array_equal(np.load(tmp_path / "a" / f"{s}.win.npy"), np.load(tmp_path / "b" / f"{s}.win.npy"))
    assert m1["counts"] == m2["counts"]


def store_files(out: Path) -> dict[str, bytes]:
    """Every file of a store; manifest.json without what names the run (command, output, workers, batch)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.name == "manifest.json":
            m = json.loads(p.read_text(encoding="utf-8"))
            del m["command"], m["config"]["output"], m["config"]["workers"], m["config"]["batch_sessions"]
            files[p.name] = json.dumps(m, sort_keys=True).encode()
        elif p.is_file():
            files[str(p.relative_to(out))] = p.read_bytes()
    return files


def test_workers_and_batching_give_identical_stores(tmp_path, monkeypatch):
    """--workers 2 (units of work cleaned in worker processes, results taken in input order) writes the
    same bytes as one process, whatever the batch sizes; small windows force multi-window sessions and
    token truncation through the vectorised writer."""
    import dialogpt_zh.data.pool as pp

    kw = dict(seed=3, valid_ratio=0.2, test_ratio=0.2, max_turns=3, max_tokens=40)
    m1 = run_preprocess(args(tmp_path / "w1", workers=1, **kw), INPUTS)
    assert m1["counts"]["by_split"]["train"]["windows"] > m1["counts"]["by_split"]["train"]["sessions"]
    assert m1["cleaning"]["total"]["utterance_tokens_truncated"] > 0
    monkeypatch.setattr(pp, "CLEAN_BATCH", 2)
    monkeypatch.setattr(pp, "UNIT_BATCHES", 2)
    m2 = run_preprocess(args(tmp_path / "w2", workers=2, batch_sessions=3, **kw), INPUTS)
    m3 = run_preprocess(args(tmp_path / "b1", workers=1, batch_sessions=1, **kw), INPUTS)
    ref = store_files(tmp_path / "w1")
    assert ref == store_files(tmp_path / "w2") == store_files(tmp_path / "b1")
    assert m1["counts"] == m2["counts"] == m3["counts"] and m1["cleaning"] == m2["cleaning"]
    # and the windows are the ones make_windows gives session by session
    store = TokenStore(tmp_path / "w1")
    sp = store.split("train")
    assert all(2 <= c <= 3 and len(sp.sequence(i, "forward")) <= 40 for i, (_, c) in enumerate(sp.win.tolist()))


def test_workers_flag_validated(tmp_path, capsys):
    assert main([str(FIXTURES / "lccc_pairs.tsv"), "--output", str(tmp_path / "o"), "--workers", "-1"]) == 2
    assert "workers" in capsys.readouterr().err
    # a process per worker: a huge count hung the machine starting them instead of being refused
    assert main([str(FIXTURES / "lccc_pairs.tsv"), "--output", str(tmp_path / "o"), "--workers", "100000"]) == 2
    assert "error: workers: must be 0 (auto) or in [1, 256], got 100000" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_keep_source_splits(tmp_path):
    m = run_preprocess(args(tmp_path / "s", keep_source_splits=True, valid_ratio=0.0, test_ratio=0.0),
                       [FIXTURES / "lccc_splits.json", FIXTURES / "kdconv_dev.json"])
    by = m["counts"]["by_source"]
    assert by["lccc_splits.json"]["train"]["sessions"] == 2 and by["lccc_splits.json"]["valid"]["sessions"] == 1
    assert by["kdconv_dev.json"]["valid"]["sessions"] == 2  # dev -> valid


def stored_sessions(out: Path) -> dict[str, list[tuple[str, ...]]]:
    """Every stored window's turns as text (spaces removed), per split."""
    store = TokenStore(out)
    tok = store.tokenizer()
    return {s: [tuple(tok.decode(u).replace(" ", "") for u in store.split(s).turns(i))
                for i in range(len(store.split(s)))] for s in store.split_names()}


def test_holdout_source_splits(tmp_path, caplog):
    from dialogpt_zh.data.readers import iter_clean_sessions

    def held_text(path, split):
        return {tuple(t.replace(" ", "").lower() for t in s.turns)
                for s in iter_clean_sessions(path) if s.split == split}

    held_valid = held_text(FIXTURES / "lccc_toy_valid.txt", "valid") | held_text(FIXTURES / "lccc_splits.json",
                                                                                 "valid")
    assert len(held_valid) == 3
    # a copy of a held-out session in a file without a split, read first: it must not be trained on either
    copy = tmp_path / "copy.tsv"
    copy.write_text("你 吃 饭 了 吗\t吃 了 ， 你 呢\n", encoding="utf-8")
    inputs = [copy, FIXTURES / "lccc_pairs.tsv", FIXTURES / "lccc_splits.json", FIXTURES / "lccc_toy_valid.txt",
              FIXTURES / "kdconv_dev.json"]

    # without the flag the held-out sessions are in the store (so the check below can fail)
    plain = run_preprocess(args(tmp_path / "plain", valid_ratio=0.0, test_ratio=0.0), inputs)
    stored = set(stored_sessions(tmp_path / "plain")["train"])
    assert held_valid <= stored

    out = tmp_path / "held"
    m = run_preprocess(args(out, valid_ratio=0.0, test_ratio=0.0, holdout_source_splits="valid, test"), inputs)
    stored = {u for sessions in stored_sessions(out).values() for s in sessions for u in s}
    held_utterances = {u for s in held_valid for u in s}
    assert held_utterances and not held_utterances & stored
    by = m["cleaning"]["by_source"]
    assert by["lccc_toy_valid.txt"]["session_held_out"] == 1  # the other one is a duplicate of the copy
    assert by["lccc_splits.json"]["session_held_out"] == 1
    assert by["copy.tsv"]["session_same_as_held_out"] == 1
    assert by["lccc_toy_valid.txt"].get("session_duplicate", 0) == 1  # its copy came first
    assert "session_held_out" not in by["kdconv_dev.json"]  # `dev` is not `valid`: names match exactly
    assert m["counts"]["by_source"]["kdconv_dev.json"]["train"]["sessions"] == \
        plain["counts"]["by_source"]["kdconv_dev.json"]["train"]["sessions"] > 0
    assert {"session_held_out", "session_same_as_held_out"} <= set(m["cleaning"]["drop_reasons"])
    kept = sum(m["counts"]["by_split"][s]["sessions"] for s in ("train", "valid", "test"))
    assert kept == plain["sessions"]["unique"] - 2 - 1 == m["sessions"]["unique"]
    assert m["split"]["held_out_source_splits"] == ["test", "valid"]
    assert m["split"]["held_out_names_not_found"] == ["test"]  # no test file among these inputs
    assert "no input has a source split named test" in caplog.text

    # the CLI flag, with the store's other splits still drawn at random from what is left
    assert main([str(p) for p in inputs] + ["--output", str(tmp_path / "cli"), "--no_progress",
                                            "--holdout-source-splits", "valid"]) == 0
    cli = json.loads((tmp_path / "cli" / "manifest.json").read_text(encoding="utf-8"))
    assert "--holdout-source-splits valid" in cli["command"]
    assert cli["cleaning"]["total"]["session_held_out"] == 2
    assert cli["cleaning"]["total"]["session_same_as_held_out"] == 1
    assert not held_utterances & {u for ss in stored_sessions(tmp_path / "cli").values() for s in ss for u in s}

    # holding out everything is an error, not an empty store
    with pytest.raises(UserError, match="held-out"):
        run_preprocess(args(tmp_path / "none", holdout_source_splits="valid"), [FIXTURES / "lccc_toy_valid.txt"])
    assert not (tmp_path / "none").exists()


def test_upsample_repeats_one_sources_train_windows_only(tmp_path):
    plain = run_preprocess(args(tmp_path / "plain", valid_ratio=0.2, test_ratio=0.2), INPUTS)
    up = run_preprocess(args(tmp_path / "up", valid_ratio=0.2, test_ratio=0.2, upsample="kdconv_dev.json=3"), INPUTS)
    kd = plain["counts"]["by_source"]["kdconv_dev.json"]["train"]
    assert kd["windows"] > 0
    assert up["upsampled"] == {"kdconv_dev.json": {"copies": 3, "windows": 2 * kd["windows"],
                                              "tokens": 2 * kd["tokens"]}}
    assert up["store_splits"]["train"]["windows"] == plain["store_splits"]["train"]["windows"] + 2 * kd["windows"]
    for split in ("valid", "test"):  # held-out splits, the tokenizer and the per-source counts: unchanged
        assert up["store_splits"][split] == plain["store_splits"][split]
    assert up["counts"] == plain["counts"]
    assert (tmp_path / "up" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "plain" / "tokenizer" / "tokenizer.json").read_bytes()
    # every kdconv train window is in the store three times, the others once
    a, b = stored_sessions(tmp_path / "plain")["train"], stored_sessions(tmp_path / "up")["train"]
    extra = list(b)
    for s in a:
        extra.remove(s)
    assert len(extra) == 2 * kd["windows"] and set(extra) <= set(a)
    assert all(b.count(s) == 3 * a.count(s) for s in set(extra))


def test_subsample_keeps_a_seeded_pick_of_one_source(tmp_path):
    plain = run_preprocess(args(tmp_path / "plain"), INPUTS)
    total = sum(plain["counts"]["by_source"]["chitchat_train.txt"][sp]["sessions"] for sp in ("train", "valid", "test"))
    assert total >= 4
    sub = run_preprocess(args(tmp_path / "sub", subsample="chitchat_train.txt=3"), INPUTS)
    assert sub["subsampled"] == {"chitchat_train.txt": {"requested": 3, "kept": 3, "of": total}}
    kept = sub["counts"]["by_source"]["chitchat_train.txt"]
    assert sum(kept[sp]["sessions"] for sp in ("train", "valid", "test")) == 3
    assert sub["cleaning"]["by_source"]["chitchat_train.txt"]["session_subsampled_out"] == total - 3
    assert "session_subsampled_out" in sub["cleaning"]["drop_reasons"]
    for source, per in plain["counts"]["by_source"].items():  # the other sources keep every session
        if source != "chitchat_train.txt":
            assert sum(per[sp]["sessions"] for sp in per) == \
                sum(sub["counts"]["by_source"][source][sp]["sessions"] for sp in per)
    # the kept sessions are a subset of the full run's (same tokenizer, so the same [UNK]s), the same ones
    # again with the same seed, and a share rounds to that many sessions
    run_preprocess(args(tmp_path / "subv", subsample="chitchat_train.txt=3",
                        vocab=str(tmp_path / "plain" / "tokenizer")), INPUTS)
    def turns(out):
        return {u for ss in stored_sessions(out).values() for s in ss for u in s}
    assert turns(tmp_path / "subv") < turns(tmp_path / "plain")
    again = run_preprocess(args(tmp_path / "again", subsample="chitchat_train.txt=3"), INPUTS)
    assert again["counts"] == sub["counts"]
    assert stored_sessions(tmp_path / "again") == stored_sessions(tmp_path / "sub")
    other = run_preprocess(args(tmp_path / "other", seed=7, subsample="chitchat_train.txt=3"), INPUTS)
    assert other["subsampled"]["chitchat_train.txt"]["kept"] == 3
    share = run_preprocess(args(tmp_path / "share", subsample="chitchat_train.txt=0.5"), INPUTS)
    assert share["subsampled"]["chitchat_train.txt"]["kept"] == round(0.5 * total)
    # asking for more than there is keeps them all
    big = run_preprocess(args(tmp_path / "big", subsample=f"chitchat_train.txt={total + 5}"), INPUTS)
    assert big["counts"] == plain["counts"]


@pytest.mark.parametrize("flag, value, message", [
    ("upsample", "kdconv_dev.json", "SOURCE=N"), ("upsample", "kdconv_dev.json=0", "SOURCE=N"),
    ("upsample", "kdconv_dev.json=0.5", "SOURCE=N"), ("upsample", "nosuch=2", "no input is named 'nosuch'"),
    ("upsample", "kdconv_dev.json=2,kdconv_dev.json=3", "given twice"),
    ("subsample", "chitchat_train.txt=0", "SOURCE=N"), ("subsample", "chitchat_train.txt=1.5", "SOURCE=N"),
    ("subsample", "chitchat_train.txt=-0.5", "SOURCE=N"), ("subsample", "nosuch=0.5", "no input is named"),
    # more than a regular expression can repeat: was an OverflowError traceback
    ("max_repeat", str(10**30), "must be in [1, 2147483647]"), ("max_repeat", "0", "must be in [1, ")])
def test_per_source_flags_bad_values_are_named(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    assert main([*map(str, INPUTS), "--output", str(out), f"--{flag}", value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and flag in err
    assert not out.exists()


def test_blocklist_and_vocab_file(tmp_path):
    block = tmp_path / "block.txt"
    block.write_text("泰坦尼克\n", encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    chars = sorted(set("".join(normalize_text(t) for t in ["你看过Breaking Bad吗？看过，是一部很棒的美剧。"]).lower())
                   - {" "})
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars) + "\n", encoding="utf-8")
    m = run_preprocess(args(tmp_path / "v", blocklist=str(block), vocab=str(vocab), valid_ratio=0.0, test_ratio=0.0),
                       [FIXTURES / "kdconv_dev.json"])
    assert m["cleaning"]["total"]["session_blocklisted"] == 1
    assert m["tokenizer"]["kind"] == "vocab" and len(m["tokenizer"]["vocab_sha256"]) == 64
    assert 0 < m["unk_rate"]["train"] < 1  # a tiny vocab: the rest of the session is [UNK], and reported


def test_gpt2_chitchat_vocab(tmp_path, shared_corpus):
    m = run_preprocess(args(tmp_path / "g", vocab=str(shared_corpus / "vocab" / "gpt2-chitchat-vocab.txt"),
                            valid_ratio=0.0, test_ratio=0.0), [FIXTURES / "chitchat_train.txt"])
    assert m["vocab_size"] == 13317 and m["unk_rate"]["train"] < 0.01


# ------------------------------------------------------------------ CLI and bad input

def test_cli_bad_inputs_exit_2_and_leave_no_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing.txt"), "--output", str(out)]) == 2
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('[["你好", "好"],\n ["x" "y"]]', encoding="utf-8")
    assert main([str(FIXTURES / "lccc_pairs.tsv"), str(bad), "--output", str(out), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json:2: malformed JSON" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert main([str(FIXTURES / "lccc_pairs.tsv"), "--output", str(out), "--format", "csv"]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert main([str(FIXTURES / "lccc_pairs.tsv"), "--output", str(out), "--valid_ratio", "0.7",
                 "--test_ratio", "0.4"]) == 2


def test_failed_run_keeps_previous_store(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(FIXTURES / "chitchat_train.txt"), "--output", str(out), "--no_progress"]) == 0
    before = (out / "manifest.json").read_bytes()
    bad = tmp_path / "bad.tsv"
    bad.write_bytes("你好\t好\n".encode() + "坏".encode("gbk") + b"\n")
    assert main([str(FIXTURES / "chitchat_train.txt"), str(bad), "--output", str(out), "--no_progress",
                 "--overwrite"]) == 2
    assert "bad.tsv:2: not UTF-8" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "out"]  # no temp directory left


def test_cli_help_has_defaults_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "(default: 256)" in text and "--max-turns" in text


def test_nothing_left_after_cleaning(tmp_path):
    p = tmp_path / "one.tsv"
    p.write_text("只有一句\n", encoding="utf-8")
    with pytest.raises(UserError, match="no sessions left"):
        run_preprocess(args(tmp_path / "o"), [p])


@pytest.mark.corpus
def test_done_when_command_on_shared_subset(tmp_path, shared_corpus, capsys):
    """The Done-when command on a subset of each source; the store loads with TokenStore."""
    sub = tmp_path / "corpus"
    (sub / "lccc").mkdir(parents=True)
    lines = (shared_corpus / "lccc-sample" / "toy_valid.txt").read_text(encoding="utf-8").splitlines(True)[:300]
    (sub / "lccc" / "toy_valid.txt").write_text("".join(lines), encoding="utf-8")
    inputs = [str(sub / "lccc"), str(shared_corpus / "kdconv" / "music" / "test.json"),
              str(shared_corpus / "chatterbot-zh"), str(shared_corpus / "subtitles-dgk" / "prisonb.conv")]
    out = tmp_path / "base"
    assert main(inputs + ["--output", str(out), "--no_progress"]) == 0
    assert "ALL" in capsys.readouterr().out
    store = TokenStore(out)
    m = store.manifest
    assert set(m["counts"]["by_source"]) == {"lccc", "test.json", "chatterbot-zh", "prisonb.conv"}
    assert m["cleaning"]["total"]["files_skipped"] == 1  # chatterbot-zh/LICENSE.md
    for s in ("train", "valid", "test"):
        assert len(store.split(s)) > 0
        assert m["unk_rate"][s] < 0.02
    tok = store.tokenizer()
    assert tok.unk_token_id not in tok.encode(normalize_text("你好,今天天气真不错"), add_special_tokens=False)


def test_arguments_are_checked_when_made():
    """Flags, --config and Python build the same dataclass, so a bad value fails there, naming the field."""
    for bad, name in ((dict(max_turns=1), "max_turns"), (dict(valid_ratio=0.6, test_ratio=0.4), "valid_ratio"),
                      (dict(format="csv"), "format"), (dict(upsample="kdconv=x"), "upsample")):
        with pytest.raises(UserError) as e:
            PreprocessArguments(output="out", **bad)
        assert e.value.field == name


def test_char_table_encoder_defers_to_the_tokenizer_on_code_points_python_calls_unassigned():
    """U+16EA0 is unassigned in Python 3.11's Unicode tables but has a lowercase mapping in the Rust
    tokenizer's newer ones: the table would read it as itself, the tokenizer as [UNK]."""
    from dialogpt_zh.tokenizer import UtteranceEncoder, build_char_tokenizer, count_chars, encode

    texts = ["\U00016ea0你好", "你好"]
    tok = build_char_tokenizer(count_chars(texts))
    enc = UtteranceEncoder(tok, np.dtype("<u2"), char_level=True, verify_every=10**9)
    enc.batches = 1  # skip the built-in check: compare ourselves
    flat, off = enc.encode(texts)
    assert enc.table is not None  # the table stays for later batches
    assert [flat[off[i]:off[i + 1]].tolist() for i in range(2)] == [encode(tok, t) for t in texts]


def test_a_feeder_whose_pipe_is_closed_mid_send_leaves_quietly():
    """kill() can close a worker's pipe while its feeder thread is between the two writes of a large unit;
    multiprocessing then fails with a TypeError (a None handle). That is the teardown, not an error to print;
    the same TypeError on an open pipe is a real bug and is raised."""
    import queue

    from dialogpt_zh.data.pool import _feed

    class Pipe:
        def __init__(self, close_first: bool) -> None:
            self.closed, self.close_first = False, close_first

        def send(self, unit) -> None:
            self.closed = self.close_first
            raise TypeError("'NoneType' object cannot be interpreted as an integer")

    units: queue.Queue = queue.Queue()
    units.put(["unit"])
    _feed(units, Pipe(close_first=True))  # returns
    units.put(["unit"])
    with pytest.raises(TypeError):
        _feed(units, Pipe(close_first=False))
