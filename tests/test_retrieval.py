"""The retrieval index (build, format, search, damage) and retrieved replies ranked with sampled ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dialogpt_zh.data.pipeline import PreprocessArguments, run_preprocess
from dialogpt_zh.data.retrieval import ARRAYS, CARD, Hit, IndexSettings, RetrievalIndex
from dialogpt_zh.data.retrieval_build import DROP_REASONS, PairFilter, build_index
from dialogpt_zh.data.store import TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.tokenizer import decode

FIXTURES = Path(__file__).resolve().parent.parent / "corpus" / "fixtures"
ALL_FIXTURES = sorted(p for p in FIXTURES.iterdir() if p.is_file())


def preprocess(out: Path, inputs, **kw) -> Path:
    run_preprocess(PreprocessArguments(output=str(out), progress=False, **kw), inputs)
    return out


def store_pairs(store: TokenStore, split: str) -> set[tuple[str, str]]:
    """(last context turn, reply) texts of every window of a split."""
    sp, tok = store.split(split), store.tokenizer()
    out = set()
    for turns in sp:
        texts = [decode(tok, t) for t in turns]
        out.update(zip(texts[:-1], texts[1:]))
    return out


def index_pairs(index: RetrievalIndex) -> set[tuple[str, str]]:
    return {(index.context(i), index.reply(i)) for i in range(index.size)}


# ------------------------------------------------------------------------------------------- building

@pytest.fixture(scope="module")
def fixtures_store(tmp_path_factory) -> Path:
    """Every corpus fixture, preprocessed; source splits kept (lccc_splits.json, heldout.json "valid" stay
    held out), the rest split at random."""
    return preprocess(tmp_path_factory.mktemp("fx") / "store", ALL_FIXTURES, keep_source_splits=True,
                      valid_ratio=0.2, test_ratio=0.2, seed=3)


def test_index_holds_train_pairs_only_never_a_held_out_one(fixtures_store, tmp_path):
    card = build_index(fixtures_store, tmp_path / "idx", IndexSettings(), "test")
    index = RetrievalIndex.load(tmp_path / "idx")
    store = TokenStore(fixtures_store)
    held_out = store_pairs(store, "valid") | store_pairs(store, "test")
    assert held_out and index.size > 20
    assert not index_pairs(index) & held_out
    assert index_pairs(index) <= store_pairs(store, "train")
    assert card["counts"]["pairs"] + sum(card["counts"]["dropped"].values()) == card["counts"]["train_pairs_read"]


def test_a_train_pair_equal_to_a_held_out_one_is_dropped(tmp_path):
    """Sessions differ (so the store keeps both) but share (last turn, reply): the index must not hold it."""
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": [["早", "早上好", "吃了吗"], ["你好", "你好呀", "在干嘛"]],
                                  "valid": [["你好", "你好呀", "吃饭了吗"]]}, ensure_ascii=False), encoding="utf-8")
    store = preprocess(tmp_path / "store", [corpus], keep_source_splits=True, valid_ratio=0.0, test_ratio=0.0)
    card = build_index(store, tmp_path / "idx", IndexSettings(), "test")
    pairs = index_pairs(RetrievalIndex.load(tmp_path / "idx"))
    assert ("你好", "你好呀") not in pairs and ("早", "早上好") in pairs and ("你好呀", "在干嘛") in pairs
    assert card["counts"]["dropped"]["same_as_held_out"] == 1


def test_filters_count_every_drop_once(tmp_path):
    corpus = tmp_path / "pairs.tsv"
    rows = ["你好\t你好呀", "你好啊\t你好", "在吗\t在", "吃了吗\t我吃了一大碗面条加了很多辣椒和牛肉",
            "你说呢\t这是坏词的回复", "早\t早上好", "早\t早上好", "晚安\t晚安好梦"]
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    block = tmp_path / "block.txt"
    block.write_text("# words\n坏词\n", encoding="utf-8")
    store = preprocess(tmp_path / "store", [corpus], valid_ratio=0.0, test_ratio=0.0)
    settings = IndexSettings(min_reply_chars=2, max_reply_chars=10, blocklist=str(block))
    card = build_index(store, tmp_path / "idx", settings, "test")
    dropped = card["counts"]["dropped"]
    assert list(dropped) == list(DROP_REASONS)
    # 你好啊 -> 你好: echo; 在吗 -> 在: too short (checked first); the long one; the blocklisted one; the second 早
    assert dropped["reply_echoes_context"] == 1 and dropped["reply_too_short"] == 1
    assert dropped["reply_too_long"] == 1 and dropped["reply_blocklisted"] == 1
    assert card["counts"]["pairs"] + sum(dropped.values()) == card["counts"]["train_pairs_read"]
    replies = {r for _, r in index_pairs(RetrievalIndex.load(tmp_path / "idx"))}
    assert replies == {"你好呀", "早上好", "晚安好梦"}
    assert card["counts"]["blocklist_words"] == 1 and card["settings"]["blocklist"] == str(block)


def test_pair_filter_reasons():
    """Each reason, on token ids directly (the unknown-token one needs an [UNK] in a reply)."""
    held_out = {(b"\x07\0\0\0", b"\x08\0\0\0\x09\0\0\0")}  # (7) -> (8, 9) as <u4 bytes
    seen = PairFilter(IndexSettings(min_reply_chars=2, max_reply_chars=4), ["坏"], held_out, {3}, unk_id=1,
                      decode=lambda ids: "".join(chr(0x4e00 + int(i)) for i in ids))
    a = np.array
    assert seen.check(a([5]), a([6, 7]), 0) is not None                   # kept
    assert seen.check(a([5]), a([6, 1]), 0) is None                       # [UNK]
    assert seen.check(a([5]), a([6, 7]), 3) is None                       # excluded source
    assert seen.check(a([5]), a([6]), 0) is None                          # too short
    assert seen.check(a([5]), a([6, 7, 8, 9, 10]), 0) is None             # too long
    assert seen.check(a([5]), a([ord("坏") - 0x4e00, 7]), 0) is None      # blocklisted
    assert seen.check(a([6, 7, 8]), a([6, 7]), 0) is None                 # echo
    assert seen.check(a([7]), a([8, 9]), 0) is None                       # a held-out pair
    assert seen.check(a([5]), a([6, 7]), 0) is None                       # duplicate
    assert seen.dropped == {r: 1 for r in DROP_REASONS}
    assert seen.by_source[0]["read"] == 8 and seen.by_source[0]["kept"] == 1 and seen.by_source[3]["read"] == 1


def test_exclude_sources_and_the_card_lists_licences(fixtures_store, tmp_path):
    card = build_index(fixtures_store, tmp_path / "all", IndexSettings(), "test")
    by_name = {s["name"]: s for s in card["sources"]}
    assert by_name["chitchat_train.txt"]["pairs"] > 0 and not by_name["chitchat_train.txt"]["excluded"]
    assert set(by_name) == {p.name for p in ALL_FIXTURES} and all("licence" in s for s in card["sources"])
    card = build_index(fixtures_store, tmp_path / "nokd", IndexSettings(exclude_sources=["chitchat_train.txt"]), "t")
    index = RetrievalIndex.load(tmp_path / "nokd")
    kd = index.source_names.index("chitchat_train.txt")
    assert not (index.source == kd).any() and index.size > 0
    assert {s["name"]: s for s in card["sources"]}["chitchat_train.txt"]["excluded"]
    assert card["counts"]["dropped"]["excluded_source"] == by_name["chitchat_train.txt"]["pairs_read"]
    with pytest.raises(UserError, match="no source named 'nope'") as e:
        build_index(fixtures_store, tmp_path / "x", IndexSettings(exclude_sources=["nope"]), "t")
    assert e.value.field == "exclude_sources" and not (tmp_path / "x").exists()


def test_excluding_from_a_version_1_store_says_to_rerun_preprocess(fixtures_store, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(fixtures_store, old)
    m = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    m["version"] = 1
    del m["sources"]
    (old / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    for f in old.glob("*.src.npy"):
        f.unlink()
    card = build_index(old, tmp_path / "ok", IndexSettings(), "t")  # without exclusions it still builds
    assert card["counts"]["pairs"] > 0
    with pytest.raises(UserError, match="re-run `python -m dialogpt_zh.preprocess`"):
        build_index(old, tmp_path / "x", IndexSettings(exclude_sources=["chitchat_train.txt"]), "t")


def test_same_store_same_bytes(fixtures_store, tmp_path):
    for name in ("a", "b"):
        build_index(fixtures_store, tmp_path / name, IndexSettings(), "test")
    assert (tmp_path / "a" / ARRAYS).read_bytes() == (tmp_path / "b" / ARRAYS).read_bytes()


def test_settings_are_checked():
    for kw, field in (({"min_reply_chars": 0}, "min_reply_chars"), ({"max_reply_chars": 1, "min_reply_chars": 2},
                      "max_reply_chars"), ({"context_weight": 1.5}, "context_weight"), ({"context_turns": -1},
                                                                                          "context_turns")):
        with pytest.raises(UserError) as e:
            IndexSettings(**kw)
        assert e.value.field == field
    assert IndexSettings(exclude_sources=["a,b", "c"]).exclude_sources == ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------- search

def test_search_finds_the_pair_whose_context_matches(fixtures_store, tmp_path):
    build_index(fixtures_store, tmp_path / "idx", IndexSettings(), "test")
    index = RetrievalIndex.load(tmp_path / "idx")
    tok = TokenStore(fixtures_store).tokenizer()
    i = next(i for i in range(index.size) if len(index.context(i)) >= 4)
    query = [tok.encode(index.context(i), add_special_tokens=False)]
    hits = index.search(query, 3)
    # the same last turn: cosine 1 for a pair without earlier turns, at least 1 / (1 + context_weight) with them
    assert hits[0].context == index.context(i) and 1 / 1.3 - 2e-3 <= hits[0].similarity <= 1 + 2e-3
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert all(isinstance(h, Hit) and h.reply_ids and h.source in index.source_names for h in hits)
    assert index.search([[tok.unk_token_id]], 3) == []          # nothing in common: no hit
    assert index.search(query, 0) == []


def test_ranked_is_the_bincount_search_and_pick_hits_builds_only_kept_hits(fixtures_store, tmp_path, monkeypatch):
    """`ranked` (what pick_hits reads) gives the pairs and similarities of the plain cosine over every posting
    (float16 weights widened to float64, bit for bit), best first, ties by pair order; pick_hits builds a
    `Hit` (texts decoded) only for the replies it keeps."""
    import numpy as np

    from dialogpt_zh.engine.retrieval import pick_hits

    build_index(fixtures_store, tmp_path / "idx", IndexSettings(), "test")
    index = RetrievalIndex.load(tmp_path / "idx")
    tok = TokenStore(fixtures_store).tokenizer()
    dense = np.zeros((index.size, len(index.terms)))
    for t in range(len(index.terms)):
        lo, hi = index.indptr[t], index.indptr[t + 1]
        dense[index.postings[lo:hi], t] = np.asarray(index.weights[lo:hi], dtype=np.float16).astype(np.float64)
    checked = 0
    for i in range(0, index.size, 7):
        query = [tok.encode(index.context(j), add_special_tokens=False) for j in (i, (i + 1) % index.size)]
        cols, weights = index.query_vector(query)
        want = dense[:, cols] @ weights
        found = np.flatnonzero(want > 0)
        order = sorted(found.tolist(), key=lambda j: (-want[j], j))[:12]
        got = index.ranked(query, 12)
        assert [p for p, _ in got] == order
        np.testing.assert_allclose([s for _, s in got], want[order], rtol=1e-12)
        assert [(h.pair, h.similarity) for h in index.search(query, 12)] == got
        checked += 1
    assert checked > 3
    built = []
    monkeypatch.setattr(index, "hit", lambda i, s, hit=index.hit: built.append(i) or hit(i, s))
    hits = pick_hits(index, query, "", 2, 100, [])
    assert len(hits) == 2 and built == [h.pair for h in hits]   # 2 kept of the 11 asked for: 2 built


# ------------------------------------------------------------------------------------------------ the CLI

def test_index_cli(fixtures_store, tmp_path, capsys):
    from dialogpt_zh.index import main

    out = tmp_path / "bot" / "retrieval"
    assert main(["--data", str(fixtures_store), "--output", str(out), "--max_reply_chars", "20"]) == 0
    printed = capsys.readouterr()
    assert "pairs kept" in printed.out and "licence" in printed.out and "wrote" in printed.err
    card = json.loads((out / CARD).read_text(encoding="utf-8"))
    assert card["command"].startswith("python -m dialogpt_zh.index --data")
    assert card["settings"]["max_reply_chars"] == 20
    before = (out / ARRAYS).read_bytes()
    assert main(["--data", str(fixtures_store), "--output", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / ARRAYS).read_bytes() == before
    assert main(["--data", str(fixtures_store), "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / CARD).read_text(encoding="utf-8"))["settings"]["max_reply_chars"] == 30
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["--data", str(fixtures_store), "--output", str(tmp_path / "other"), "--overwrite"]) == 2
    assert "not a retrieval index" in capsys.readouterr().err and (tmp_path / "other" / "notes.txt").exists()
    assert main(["--output", str(tmp_path / "x")]) == 2 and "--data" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "data directory not found" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["--data", str(fixtures_store), "--output", str(tmp_path / "x"), "--context_weight", "2"]) == 2
    # the index never goes into (or over) its input
    before = sorted(p.relative_to(fixtures_store) for p in fixtures_store.rglob("*"))
    for output in (fixtures_store / "retrieval", fixtures_store, fixtures_store.parent):
        assert main(["--data", str(fixtures_store), "--output", str(output), "--overwrite"]) == 2
        assert "the token store" in capsys.readouterr().err
    assert sorted(p.relative_to(fixtures_store) for p in fixtures_store.rglob("*")) == before
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--exclude_sources" in help_text and "(default: 30)" in help_text and "examples:" in help_text


# ------------------------------------------------------------------------------------ damaged indexes

def _rewrite_npz(directory: Path, change) -> None:
    """Rewrite index.npz with `change(arrays)` applied, and the card's size and sha256 made to match, so the
    array checks (not the checksum) must find it."""
    from dialogpt_zh.data.retrieval import file_sha256
    from dialogpt_zh.data.retrieval_build import write_npz

    with np.load(directory / ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    write_npz(directory / ARRAYS, arrays)
    card = json.loads((directory / CARD).read_text(encoding="utf-8"))
    card["files"][ARRAYS] = {"bytes": (directory / ARRAYS).stat().st_size, "sha256": file_sha256(directory / ARRAYS)}
    (directory / CARD).write_text(json.dumps(card), encoding="utf-8")


def _edit_card(directory: Path, **changes) -> None:
    card = json.loads((directory / CARD).read_text(encoding="utf-8"))
    card.update(changes)
    (directory / CARD).write_text(json.dumps(card), encoding="utf-8")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("missing directory", lambda d: shutil.rmtree(d), "retrieval index not found"),
    ("no card", lambda d: (d / CARD).unlink(), "not a retrieval index: no index.json"),
    ("card truncated", lambda d: (d / CARD).write_text((d / CARD).read_text()[:50]), "index.json:"),
    ("foreign card", lambda d: (d / CARD).write_text('{"format": "something.else"}'), "not a dialogpt_zh retrieval"),
    ("card a list", lambda d: (d / CARD).write_text("[1]"), "not a dialogpt_zh retrieval"),
    ("newer version", lambda d: _edit_card(d, version=99), "index version 99 is not supported"),
    ("counts missing", lambda d: _edit_card(d, counts={}), "(field 'counts.pairs')"),
    ("npz missing", lambda d: (d / ARRAYS).unlink(), "index.npz: missing index file"),
    ("npz truncated", lambda d: (d / ARRAYS).write_bytes((d / ARRAYS).read_bytes()[:1000]), "index.npz: 1,000 bytes"),
    ("npz damaged", lambda d: _flip_byte(d / ARRAYS), "index.npz: sha256 differs"),
    ("npz not a zip", lambda d: _rewrite_card_sha(d, b"not a zip file at all"), "index.npz: unreadable .npz"),
    ("array of another dtype", lambda d: _rewrite_npz(d, lambda a: a.update(terms=a["terms"].astype(np.float64))),
     "array 'terms': expected <i8"),
    ("array missing", lambda d: _rewrite_npz(d, lambda a: a.pop("idf")), "array 'idf' missing"),
    ("posting past the pairs", lambda d: _rewrite_npz(d, lambda a: a["postings_pair"].__setitem__(0, 10 ** 6)),
     "a posting points past the pairs"),
    ("offsets out of order", lambda d: _rewrite_npz(d, lambda a: a["reply_offsets"].__setitem__(1, -1)),
     "'reply_offsets' must rise"),
    ("retrieval/ a file", lambda d: (shutil.rmtree(d), d.write_text("x")), "retrieval index is not a directory"),
    ("card number too long to parse", lambda d: (d / CARD).write_text('{"version": 1' + "0" * 5000 + "}"),
     "index.json: unreadable card (ValueError"),
    ("card nested too deep", lambda d: (d / CARD).write_text("[" * 100_000 + "]" * 100_000),
     "index.json: unreadable card (RecursionError"),
    ("npz a lone .npy", lambda d: _rewrite_card_sha(d, _npy_bytes(np.arange(5))), "index.npz: unreadable .npz"),
    ("header claims a huge array", lambda d: _rewrite_card_sha(d, _npz_claiming_shape(d, "terms", 10 ** 13)),
     "array 'terms': expected <i8"),
    ("reply text not UTF-8", lambda d: _rewrite_npz(d, lambda a: a["reply_text"].__setitem__(0, 0xFF)),
     "'reply_text' is not UTF-8"),
    ("text offset inside a character", lambda d: _rewrite_npz(d, lambda a: a["context_text_offsets"].__setitem__(
        1, a["context_text_offsets"][1] + 1)), "'context_text' is not UTF-8 text cut at character boundaries"),
    ("weight above 1", lambda d: _rewrite_npz(d, lambda a: a["postings_weight"].__setitem__(0, 600)),
     "a posting weight is outside [0, 1]"),
    ("idf negative", lambda d: _rewrite_npz(d, lambda a: a["idf"].__setitem__(slice(None), -1)),
     "an idf is not positive"),
]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


def _npz_claiming_shape(directory: Path, name: str, n: int) -> bytes:
    """index.npz whose array `name` has a header claiming `n` elements (its data left as it was)."""
    import io
    import zipfile

    with np.load(directory / ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, a in arrays.items():
            data = _npy_bytes(a)
            if k == name:
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {**np.lib.format.header_data_from_array_1_0(a),
                                                              "shape": (n,)})
                data = header.getvalue() + a.tobytes()
            zf.writestr(f"{k}.npy", data)
    return buf.getvalue()


def _rewrite_card_sha(directory: Path, data: bytes) -> None:
    from dialogpt_zh.data.retrieval import file_sha256

    (directory / ARRAYS).write_bytes(data)
    card = json.loads((directory / CARD).read_text(encoding="utf-8"))
    card["files"][ARRAYS] = {"bytes": len(data), "sha256": file_sha256(directory / ARRAYS)}
    (directory / CARD).write_text(json.dumps(card), encoding="utf-8")


@pytest.fixture(scope="module")
def built_index(fixtures_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "retrieval"
    build_index(fixtures_store, out, IndexSettings(), "test")
    return out


@pytest.mark.parametrize("damage, message", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_a_damaged_index_is_an_error_naming_its_file(built_index, tmp_path, damage, message):
    d = tmp_path / "retrieval"
    shutil.copytree(built_index, d)
    RetrievalIndex.load(d)  # whole, it loads
    damage(d)
    with pytest.raises(UserError) as e:
        RetrievalIndex.load(d)
    assert message in str(e.value) and str(d) in str(e.value)


def test_an_index_of_another_tokenizer_is_refused(built_index, fixtures_store, fixture_tokenizer):
    RetrievalIndex.load(built_index, TokenStore(fixtures_store).tokenizer())  # its own store's: fine
    with pytest.raises(UserError, match="built with another tokenizer") as e:
        RetrievalIndex.load(built_index, fixture_tokenizer)
    assert str(built_index / CARD) in str(e.value)


def test_a_card_whose_vocab_size_was_edited_is_refused(built_index, fixtures_store, tmp_path):
    """Same fingerprint, a larger vocab_size: the id checks would let ids past the model's vocabulary through."""
    d = tmp_path / "retrieval"
    shutil.copytree(built_index, d)
    card = json.loads((d / CARD).read_text(encoding="utf-8"))
    _edit_card(d, counts={**card["counts"], "vocab_size": 10 ** 9})
    with pytest.raises(UserError, match="10000000000? tokens where the bot's tokenizer") as e:
        RetrievalIndex.load(d, TokenStore(fixtures_store).tokenizer())
    assert e.value.field == "counts.vocab_size" and str(d / CARD) in str(e.value)


@pytest.mark.parametrize("name", [CARD, ARRAYS])
def test_an_unreadable_index_file_is_an_error_naming_it(built_index, tmp_path, monkeypatch, name):
    """No read permission (as root, chmod 000 does not stop a read: the refusal is simulated)."""
    import builtins

    d = tmp_path / "retrieval"
    shutil.copytree(built_index, d)
    real_open = builtins.open

    def no_permission(file, *args, **kw):
        if str(file) == str(d / name):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", no_permission)
    monkeypatch.setattr("io.open", no_permission)
    with pytest.raises(UserError, match="Permission denied") as e:
        RetrievalIndex.load(d)
    assert str(d / name) in str(e.value)


def test_an_index_directory_without_search_permission_is_an_error_naming_it(built_index, tmp_path, monkeypatch):
    """chmod 000 on the directory: is_file() of its card raises (simulated: root passes any permission)."""
    d = tmp_path / "retrieval"
    shutil.copytree(built_index, d)
    real_is_file = Path.is_file

    def no_search(self):
        if self.parent == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", no_search)
    with pytest.raises(UserError, match="Permission denied") as e:
        RetrievalIndex.load(d)
    assert str(d) in str(e.value)


def test_similarity_is_scikit_learns_tfidf_cosine(fixtures_store, tmp_path):
    """With the last turn only (context_turns 0), similarities are those of scikit-learn's TfidfVectorizer
    (sublinear tf, smooth idf, l2 rows) over the same token-id unigrams and bigrams, up to float16 storage."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    build_index(fixtures_store, tmp_path / "idx", IndexSettings(context_turns=0), "test")
    index = RetrievalIndex.load(tmp_path / "idx")
    tok = TokenStore(fixtures_store).tokenizer()
    docs = [tok.encode(index.context(i), add_special_tokens=False) for i in range(index.size)]

    def grams(ids):
        ids = [i for i in ids]
        return [str(a) for a in ids if a != tok.unk_token_id] + [
            f"{a}_{b}" for a, b in zip(ids, ids[1:]) if tok.unk_token_id not in (a, b)]

    vec = TfidfVectorizer(analyzer=grams, sublinear_tf=True, smooth_idf=True, norm="l2")
    matrix = vec.fit_transform(docs)
    query = tok.encode("你好,今天过得怎么样", add_special_tokens=False)
    want = (matrix @ vec.transform([query]).T).toarray().ravel()
    hits = index.search([query], index.size)
    assert len(hits) == int((want > 0).sum()) > 3
    for h in hits:
        assert h.similarity == pytest.approx(want[h.pair], abs=3e-3)


# ------------------------------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def hybrid_bot_dir(random_bot_dir, tmp_path_factory) -> Path:
    """The random bot with an index of the chitchat fixtures, built from a store that shares its vocabulary."""
    root = tmp_path_factory.mktemp("hybrid_bot")
    for part in ("forward", "backward"):
        shutil.copytree(random_bot_dir / part, root / part)
    store = preprocess(root.parent / "hybrid_store", [FIXTURES / "chitchat_train.txt"], valid_ratio=0.0,
                       test_ratio=0.0, vocab=str(random_bot_dir / "forward"))
    build_index(store, root / "retrieval", IndexSettings(max_reply_chars=12), "test")
    return root


@pytest.fixture(scope="module")
def hybrid_bot(hybrid_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    return ChatBot.from_pretrained(hybrid_bot_dir, generation=GenerationSettings(num_candidates=4, max_length=12))


HISTORY = ["周末有什么安排", "想去看电影"]


def test_retrieved_replies_join_the_sampled_ones(hybrid_bot):
    bot = hybrid_bot
    assert bot.retrieval is not None and bot.retrieval.size > 10
    plain = bot.reply(HISTORY, seed=3, retrieval_candidates=0)
    hybrid = bot.reply(HISTORY, seed=3, retrieval_candidates=5, retrieved_bonus=0.0)
    # sampling is untouched by retrieval: the same samples, with the same forward scores
    sampled = {c.text: c.forward_logprob for c in plain.candidates}
    assert {c.text: c.forward_logprob for c in hybrid.candidates if "sampled" in c.source} == sampled
    retrieved = [c for c in hybrid.candidates if "retrieved" in c.source]
    assert len(retrieved) == 5 and all(0 < c.similarity <= 1.0 + 1e-6 for c in retrieved)
    assert all(c.similarity is None for c in hybrid.candidates if c.source == "sampled")
    assert all(c.count == 0 and c.backward_logprob is not None for c in retrieved if c.source == "retrieved")
    assert [c.rank for c in hybrid.candidates] == list(range(1, len(hybrid.candidates) + 1))
    assert sorted((c.score for c in hybrid.candidates), reverse=True) == [c.score for c in hybrid.candidates]
    assert "retrieve" in hybrid.timings and not plain.timings["retrieve"]
    # a retrieved reply is scored as `rerank` scores the same text; the default ranking does not read the
    # forward term (forward_weight 0), so a retrieved-only reply gets no forward pass ...
    c = next(c for c in retrieved if c.source == "retrieved")
    assert all(x.forward_logprob is None for x in retrieved if x.source == "retrieved")
    (again,) = [x for x in bot.rerank(HISTORY, [c.text]) if x.text == c.text]
    assert c.backward_logprob == pytest.approx(again.backward_logprob, abs=1e-3)
    assert c.score == pytest.approx(again.score, abs=1e-4)
    # ... and with a forward weight it gets the teacher-forced forward score rerank computes
    weighted = bot.reply(HISTORY, seed=3, retrieval_candidates=5, forward_weight=0.5, retrieved_bonus=0.0)
    c = next(x for x in weighted.candidates if x.source == "retrieved")
    (again,) = [x for x in bot.rerank(HISTORY, [c.text], forward_weight=0.5) if x.text == c.text]
    assert c.forward_logprob == pytest.approx(again.forward_logprob, abs=1e-3)
    assert c.score == pytest.approx(again.score, abs=1e-4)


def test_teacher_forced_forward_scores_equal_the_sampled_ones(hybrid_bot):
    """What the decoder summed while sampling = the teacher-forced pass used for retrieved replies."""
    bot = hybrid_bot
    job = bot.prepare_reply(HISTORY, seed=5, retrieval_candidates=0)
    reply = bot.reply_many([job])[0]
    got = bot._forward_scores_pairs([(job.context, c.token_ids) for c in reply.candidates])
    for c, (fwd, n) in zip(reply.candidates, got):
        assert fwd == pytest.approx(c.forward_logprob, abs=1e-3) and n == c.num_tokens


def test_requests_with_and_without_retrieval_in_one_batch(hybrid_bot):
    bot = hybrid_bot
    alone = [bot.reply(HISTORY, seed=1, retrieval_candidates=3),
             bot.reply(["你喜欢什么运动"], seed=2, retrieval_candidates=0)]
    together = bot.reply_many([bot.prepare_reply(HISTORY, seed=1, retrieval_candidates=3),
                                bot.prepare_reply(["你喜欢什么运动"], seed=2, retrieval_candidates=0)])
    for a, b in zip(alone, together):
        assert [(c.text, c.source) for c in a.candidates] == [(c.text, c.source) for c in b.candidates]
        for x, y in zip(a.candidates, b.candidates):
            assert x.score == pytest.approx(y.score, abs=1e-4)
    assert not any("retrieved" in c.source for c in together[1].candidates)


def test_merge_marks_a_text_both_sampled_and_retrieved():
    from dialogpt_zh.engine.results import Candidate
    from dialogpt_zh.engine.retrieval import merge_hits

    sampled = Candidate(text="好的", token_ids=[7, 8], forward_logprob=-3.0, backward_logprob=None, num_tokens=3,
                        num_context_tokens=5, score=0.0, count=2)
    by_text = {"好的": sampled}
    hits = [Hit(0, 0.9, [7, 8], "好的", "走吧", "a"), Hit(1, 0.5, [9], "嗯", "走吧", "a")]
    new = merge_hits(by_text, hits, 5)
    assert [c.text for c in new] == ["嗯"] and new[0].source == "retrieved" and new[0].count == 0
    assert sampled.source == "sampled+retrieved" and sampled.similarity == 0.9 and sampled.count == 2
    assert sampled.forward_logprob == -3.0 and list(by_text) == ["好的", "嗯"]


def test_retrieval_skips_echoes_and_overlong_replies(hybrid_bot):
    from dialogpt_zh.engine.retrieval import pick_hits

    index = hybrid_bot.retrieval
    tok = hybrid_bot.tokenizer
    i = next(i for i in range(index.size) if len(index.reply(i)) >= 3)
    context = [tok.encode(index.context(i), add_special_tokens=False)]
    notices: list[str] = []
    all_hits = pick_hits(index, context, "", 50, 100, notices)
    echo = all_hits[0].text
    hits = pick_hits(index, context, "我说" + echo, 50, 100, [])
    assert echo not in [h.text for h in hits]
    shortest = min(len(h.reply_ids) for h in all_hits)
    hits = pick_hits(index, context, "", 50, shortest, notices)
    assert hits and all(len(h.reply_ids) <= shortest for h in hits)
    assert any("over max_length" in n for n in notices)


def test_retrieval_settings_and_a_bot_without_an_index(random_bot_dir, hybrid_bot):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings, SettingsError

    for bad in (-2, 257, 1.5):
        with pytest.raises(SettingsError) as e:
            GenerationSettings(retrieval_candidates=bad)
        assert e.value.field == "retrieval_candidates"
    with pytest.raises(SettingsError):
        hybrid_bot.reply(HISTORY, retrieval_candidates=1000)
    bot = ChatBot.from_pretrained(random_bot_dir)
    assert bot.retrieval is None
    reply = bot.reply(HISTORY, seed=0, retrieval_candidates=3, num_candidates=2, max_length=5)
    assert any("no retrieval index" in n for n in reply.notices)
    assert all(c.source == "sampled" for c in reply.candidates)
    with pytest.raises(UserError, match="no retrieval index") as e:
        ChatBot.from_pretrained(random_bot_dir, generation=GenerationSettings(retrieval_candidates=3))
    assert e.value.field == "retrieval_candidates"
    with pytest.raises(UserError, match="no retrieval index"):
        bot.retrieve(HISTORY)


def test_a_damaged_or_foreign_index_in_a_bot_dir_stops_the_face_cleanly(hybrid_bot_dir, tmp_path, capsys,
                                                                        fixtures_store):
    from dialogpt_zh.interact import main

    bot = tmp_path / "bot"
    shutil.copytree(hybrid_bot_dir, bot)
    (bot / "retrieval" / ARRAYS).write_bytes((bot / "retrieval" / ARRAYS).read_bytes()[:100])
    assert main(["--model", str(bot)]) == 2
    err = capsys.readouterr().err
    assert str(bot / "retrieval" / ARRAYS) in err and "Traceback" not in err
    shutil.rmtree(bot / "retrieval")
    build_index(fixtures_store, bot / "retrieval", IndexSettings(), "test")  # another vocabulary
    assert main(["--model", str(bot)]) == 2
    err = capsys.readouterr().err
    assert "built with another tokenizer" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- the faces

def test_faces_show_where_each_candidate_came_from(hybrid_bot, hybrid_bot_dir, tmp_path):
    from dialogpt_zh.interact import format_candidates
    from dialogpt_zh.judging.feedback import Judgement, make_record
    from dialogpt_zh.webui.view import CANDIDATE_HEADERS, candidates_table

    reply = hybrid_bot.reply(HISTORY, seed=0, retrieval_candidates=4)
    table = format_candidates(reply)
    assert "source" in table.splitlines()[0] and "retrieved" in table and "retrieve" in table.splitlines()[-1]
    rows = candidates_table(reply)
    assert CANDIDATE_HEADERS[-2:] == ["来源", "检索相似度"] and all(len(r) == len(CANDIDATE_HEADERS) for r in rows)
    assert {r[-2] for r in rows} >= {"检索"} and any(r[-1] is not None for r in rows)
    rec = make_record(HISTORY, reply, Judgement("pick", reply.candidates[0].text, 1), {}, {}, "test")
    assert {c["source"] for c in rec["candidates"]} >= {"retrieved"}
    assert all((c["similarity"] is None) == (c["source"] == "sampled") for c in rec["candidates"])


def test_rerank_adds_the_indexs_replies(hybrid_bot_dir, tmp_path, capsys):
    from dialogpt_zh.rerank import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"context": HISTORY, "candidates": ["好啊", "一部科幻片"]}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--output", str(out), "--model", str(hybrid_bot_dir), "--retrieval_candidates", "3",
                 "--no_progress"]) == 0
    assert "+ 3 retrieved" in capsys.readouterr().err or "retrieved" in out.read_text(encoding="utf-8")
    rec = json.loads(out.read_text(encoding="utf-8"))
    given, added = rec["candidates"][:2], rec["candidates"][2:]
    assert [c["text"] for c in given] == ["好啊", "一部科幻片"] and all(c["source"].startswith("given") for c in given)
    assert added and all(c["source"] == "retrieved" and c["similarity"] > 0 for c in added)
    assert sorted(c["rank"] for c in rec["candidates"]) == list(range(1, len(rec["candidates"]) + 1))


def test_arena_key_and_score_say_which_replies_were_retrieved(hybrid_bot, tmp_path):
    from dialogpt_zh.judging import arena

    contexts = [{"context": HISTORY}, {"context": ["你喜欢什么运动"]}, {"context": ["今天天气真好"]}]
    sources: dict = {}
    pairs, order = arena.make_pairs(contexts, {"A": hybrid_bot, "B": hybrid_bot},
                                    {"A": {"retrieval_candidates": 10, "num_candidates": 1},
                                     "B": {"retrieval_candidates": 0}}, 0, False,
                                    sources)
    assert set(sources) == {p["id"] for p in pairs} and all(set(s) == {"A", "B"} for s in sources.values())
    assert all(s["B"] == "sampled" for s in sources.values())
    assert any("retrieved" in s["A"] for s in sources.values())   # 10 human replies against 1 sample
    arena.write_pairs(tmp_path / "p.json", tmp_path / "p.key.json", pairs, order, {}, {}, sources=sources)
    assert "retrieved" not in (tmp_path / "p.json").read_text(encoding="utf-8")   # the judge never sees it
    key = json.loads((tmp_path / "p.key.json").read_text(encoding="utf-8"))
    assert key["sources"] == sources
    verdicts = {p["id"]: "a" if order[p["id"]][0] == "A" else "b" for p in pairs}   # A wins every pair
    result = arena.tally(verdicts, order, len(pairs), key["sources"])
    wins = {s: sum(r["wins"] for r in rows.values()) for s, rows in result["by_source"].items()}
    assert wins == {"A": 3, "B": 0}
    text = arena.format_tally(result, None)
    assert "A's judged replies by source" in text and "retrieved" in text
    # the key's systems say the counts each side ran with, "auto" resolved (the CLI writes describe_system)
    from dialogpt_zh.arena import describe_system

    assert describe_system(hybrid_bot, "bot", {})["candidates"] == {"sampled": 4, "retrieved": 10}
    assert describe_system(hybrid_bot, "bot", {"retrieval_candidates": 0, "num_candidates": -1}
                           )["candidates"] == {"sampled": 10, "retrieved": 0}


def test_arena_refuses_retrieval_settings_for_a_bot_without_an_index(hybrid_bot_dir, random_bot_dir, tmp_path,
                                                                      capsys):
    """--a_set/--b_set are per-call settings: without a refusal the replies quietly had no retrieved ones and the
    key still said they had."""
    from dialogpt_zh.arena import main

    base = ["--data", str(FIXTURES / "heldout.json"), "--pairs", "2", "--a", str(hybrid_bot_dir), "--b",
            str(random_bot_dir), "--make", str(tmp_path / "pairs.json")]
    assert main([*base, "--b_set", "retrieval_candidates=3"]) == 2
    err = capsys.readouterr().err
    assert "b_set" in err and "no retrieval index" in err and not (tmp_path / "pairs.json").exists()
    assert main([*base, "--a_set", "retrieval_candidates=3"]) == 0   # A has one


# ------------------------------------------------------------------------------------------ evaluation

def test_evaluate_retrieval_and_hybrid_decoders(hybrid_bot_dir, random_bot_dir, tmp_path, capsys):
    from dialogpt_zh import evaluate as E

    fast = ["--data", str(FIXTURES / "heldout.json"), "--max_length", "8", "--num_candidates", "3", "--no_progress",
            "--no_selection", "--threads", "1", "--limit", "4"]
    out = tmp_path / "r.json"
    assert E.main([*fast, "--model", str(hybrid_bot_dir), "--decoders", "mmi,retrieval,hybrid",
                   "--retrieval_candidates", "5", "--output", str(out), "--samples", str(tmp_path / "s.jsonl")]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    dec = report["decoding"]
    assert dec["retrieval"]["retrieved_pct"] == 100.0 and dec["retrieval"]["verbatim_train_pct"] == 100.0
    assert dec["mmi"]["retrieved_pct"] == 0.0      # mmi stays sampled only, even with --retrieval_candidates
    assert 0.0 <= dec["hybrid"]["retrieved_pct"] <= 100.0 and dec["hybrid"]["verbatim_train_pct"] is not None
    assert sum(dec["hybrid"]["reply_sources"].values()) == report["cases"]
    assert report["settings"]["model"]["retrieval"]["pairs"] > 10
    counts = {k: report["settings"]["eval"][k] for k in ("num_candidates_mmi", "num_candidates_hybrid",
                                                          "retrieval_candidates_hybrid")}
    assert counts == {"num_candidates_mmi": 3, "num_candidates_hybrid": 3, "retrieval_candidates_hybrid": 5}
    sample = json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert {c["source"] for c in sample["candidates"]["hybrid"]} >= {"retrieved"}
    assert "verbatim training reply %" in capsys.readouterr().out
    # hybrid needs K > 0 (auto, the default, gives it one with an index); a bot without an index reports both
    # decoders absent
    assert E.main([*fast, "--model", str(hybrid_bot_dir), "--decoders", "hybrid", "--retrieval_candidates", "0",
                   "--output", str(out)]) == 2
    assert "--retrieval_candidates" in capsys.readouterr().err
    assert E.main([*fast, "--model", str(random_bot_dir), "--decoders", "mmi,retrieval,hybrid",
                   "--retrieval_candidates", "5", "--output", str(tmp_path / "n.json")]) == 0
    report = json.loads((tmp_path / "n.json").read_text(encoding="utf-8"))
    assert list(report["decoding"]) == ["mmi"] and "no retrieval index" in report["absent"]["decoding.hybrid"]
    assert report["decoding"]["mmi"]["verbatim_train_pct"] is None


def test_retrieved_bonus_lifts_retrieved_replies_and_only_them(hybrid_bot):
    bot = hybrid_bot
    base = bot.reply(HISTORY, seed=3, retrieval_candidates=5, retrieved_bonus=0.0)
    lifted = bot.reply(HISTORY, seed=3, retrieval_candidates=5, retrieved_bonus=100.0)
    before = {c.text: c.score for c in base.candidates}
    for c in lifted.candidates:
        assert c.score == pytest.approx(before[c.text] + (100.0 if "retrieved" in c.source else 0.0), abs=1e-4)
    assert "retrieved" in lifted.candidates[0].source


def test_auto_retrieval_uses_the_index_when_there_is_one(hybrid_bot, hybrid_bot_dir):
    """retrieval_candidates -1 (the default): AUTO_RETRIEVAL_CANDIDATES for a bot with an index, 0 (and no
    notice) for one without; num_candidates -1 (the default) then samples fewer beside retrieved replies; rerank
    adds none to the candidates it is given."""
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import (
        AUTO_NUM_CANDIDATES,
        AUTO_NUM_CANDIDATES_WITH_RETRIEVAL,
        AUTO_RETRIEVAL_CANDIDATES,
        GenerationSettings,
    )

    def samples(reply) -> int:  # draws, duplicates merged into one candidate included
        return sum(c.count for c in reply.candidates)

    assert (GenerationSettings().retrieval_candidates, GenerationSettings().num_candidates) == (-1, -1)
    bot = ChatBot.from_pretrained(hybrid_bot_dir)
    auto = bot.reply(HISTORY, seed=3)
    retrieved = [c for c in auto.candidates if "retrieved" in c.source]
    assert 0 < len(retrieved) <= AUTO_RETRIEVAL_CANDIDATES
    assert samples(auto) == AUTO_NUM_CANDIDATES_WITH_RETRIEVAL < AUTO_NUM_CANDIDATES
    assert samples(bot.reply(HISTORY, seed=3, retrieval_candidates=0)) == AUTO_NUM_CANDIDATES
    assert samples(bot.reply(HISTORY, seed=3, num_candidates=7)) == 7      # a number given is kept
    assert bot.settings()[0].num_candidates == AUTO_NUM_CANDIDATES_WITH_RETRIEVAL
    without = ChatBot.from_pretrained(forward=hybrid_bot_dir / "forward", backward=hybrid_bot_dir / "backward")
    assert without.retrieval is None
    reply = without.reply(HISTORY, seed=3)
    assert all(c.source == "sampled" for c in reply.candidates) and not any("retriev" in n for n in reply.notices)
    assert samples(reply) == AUTO_NUM_CANDIDATES
    assert {c.source for c in hybrid_bot.rerank(HISTORY, ["去看什么电影"])} == {"given"}


def test_only_echoes_is_a_reply_that_says_nothing_but_the_message():
    from dialogpt_zh.data.retrieval import only_echoes

    assert only_echoes("你好", "你好啊")            # contained
    assert only_echoes("你好你好你好", "你好")       # the message repeated
    assert only_echoes("你好!你好。", "你好")        # punctuation aside
    assert only_echoes("在 吗", "在吗?")
    assert not only_echoes("你好吗?", "你好")       # says more
    assert not only_echoes("您好您好", "你好")
    assert not only_echoes("!!", "你好") and not only_echoes("你好", "!!")  # nothing to echo / no words
    assert only_echoes("。。。", "好。。。") and not only_echoes("", "你好")  # punctuation only: containment


def test_retrieval_skips_replies_that_only_echo_the_message(hybrid_bot):
    """The skip reads the message as `only_echoes` does (spaces and punctuation aside, repeats count), not
    as plain substring containment."""
    from dialogpt_zh.engine.retrieval import pick_hits

    index = hybrid_bot.retrieval
    i = next(i for i in range(index.size) if len(index.reply(i)) >= 2)
    context = [hybrid_bot.tokenizer.encode(index.context(i), add_special_tokens=False)]
    reply = pick_hits(index, context, "", 50, 100, [])[0].text
    spaced = " ".join(reply)                      # LCCC-style spacing: not a substring match any more
    assert reply not in spaced
    notices: list[str] = []
    assert reply not in [h.text for h in pick_hits(index, context, spaced, 50, 100, notices)]
    part = " ".join(reply[:2])                    # the reply says more than this message: no echo
    assert reply in [h.text for h in pick_hits(index, context, part, 50, 100, [])]


def test_rerank_of_no_given_candidates_ranks_the_indexs_replies(hybrid_bot):
    """rerank with K and nothing given ranks the index's replies alone (it returned [] before looking)."""
    ranked = hybrid_bot.rerank(HISTORY, [], retrieval_candidates=3)
    assert 0 < len(ranked) <= 3 and {c.source for c in ranked} == {"retrieved"}
    assert [c.rank for c in ranked] == list(range(1, len(ranked) + 1))
    assert hybrid_bot.rerank(HISTORY, []) == []          # nothing given, nothing asked of the index


def test_rerank_cli_record_with_no_candidates_gets_the_indexs_replies(hybrid_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.rerank import rerank_record
    from dialogpt_zh.settings import GenerationSettings

    bot = ChatBot.from_pretrained(hybrid_bot_dir, generation=GenerationSettings(retrieval_candidates=3, max_length=12))
    out = rerank_record(bot, {"context": HISTORY, "candidates": []}, HISTORY, [])
    assert out["candidates"] and {c["source"] for c in out["candidates"]} == {"retrieved"}
    assert out["best"] == out["candidates"][0]["text"] and out["mmi"] is True
