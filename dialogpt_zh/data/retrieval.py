"""The retrieval index: human (context -> reply) pairs of a token store's train split, found by TF-IDF.

A directory (`BOT_DIR/retrieval/`, written by `python -m dialogpt_zh.index`; building: `retrieval_build.py`):

  index.json  the card: format + version, the tokenizer's fingerprint (`tokenizer_fingerprint`), the
              featurizer's settings, counts, the filters and their drops, the sources with their licences,
              the command that built it, and the size + sha256 of index.npz;
  index.npz   numpy arrays only, deflated (read with allow_pickle=False, never unpickled):
      terms            int64 [T]   sorted n-gram keys: a token id t (unigram), or V + a*V + b (bigram a b),
                                   V = the tokenizer's size; n-grams with [UNK] are left out
      idf              float32 [T] smooth idf: ln((1 + pairs) / (1 + df)) + 1
      postings_indptr  int64 [T+1] the inverted index (the key matrix transposed, CSR): term t's pairs are
      postings_pair    int32 [nnz]   postings_pair[indptr[t]:indptr[t+1]], their weights
      postings_weight  float16 [nnz] postings_weight[...] (each pair's key vector has unit length)
      reply_ids / reply_offsets        the replies' token ids (the store's own), concatenated, int64 offsets
      reply_text / reply_text_offsets  the replies' text (UTF-8 bytes), as `decode` gives it
      context_text / context_text_offsets  the last context turn of each pair (to show where a reply came from)
      source           uint16 [pairs] index into the card's `sources`

Key vector of a pair (and of a query): the unit vector of tfidf(last turn) + context_weight * tfidf(the
`context_turns` turns before it), each part unit length first; tf is sublinear (1 + ln tf). The similarity
of a query and a pair is their dot product (cosine). Texts are the store's: normalised and masked as the
model saw them; the ids are what the model was trained on.
"""
from __future__ import annotations

import json
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import file_sha256
from dialogpt_zh.settings import field_help

INDEX_FORMAT = "dialogpt_zh.retrieval_index"
INDEX_VERSION = 1
CARD = "index.json"
ARRAYS = "index.npz"
RETRIEVAL_DIR = "retrieval"   # the index inside a bot directory


@dataclass
class IndexSettings:
    """What goes into an index and how pairs are matched (recorded in the card; a query uses the card's)."""

    min_reply_chars: int = field(default=2, metadata=field_help("shortest reply kept, in characters"))
    max_reply_chars: int = field(default=30, metadata=field_help(
        "longest reply kept, in characters (the engine also skips replies over max_length tokens)"))
    context_turns: int = field(default=2, metadata=field_help(
        "turns before the last one that a pair's key (and a query) holds, at --context_weight (0 = the last "
        "turn only)"))
    context_weight: float = field(default=0.3, metadata=field_help(
        "weight of those earlier turns against the last turn (both parts unit length first; 0..1)"))
    blocklist: str | None = field(default=None, metadata=field_help(
        "file with one word per line (`#` comments): pairs whose reply contains one are left out"))
    exclude_sources: list[str] = field(default_factory=list, metadata=field_help(
        "sources (the store's input names, e.g. kdconv) whose pairs are left out, e.g. a corpus whose licence "
        "does not allow quoting its text"))

    def __post_init__(self) -> None:
        for name, lo, hi in (("min_reply_chars", 1, 10_000), ("max_reply_chars", 1, 10_000),
                             ("context_turns", 0, 100)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise UserError(f"must be a whole number in [{lo}, {hi}], got {v!r}", field=name)
        if self.max_reply_chars < self.min_reply_chars:
            raise UserError(f"must be >= min_reply_chars ({self.min_reply_chars}), got {self.max_reply_chars}",
                            field="max_reply_chars")
        w = self.context_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
            raise UserError(f"must be a number in [0, 1], got {w!r}", field="context_weight")
        self.context_weight = float(w)
        self.exclude_sources = [s for item in self.exclude_sources for s in str(item).split(",") if s.strip()]


# ------------------------------------------------------------------------------------------ featurizer

def ngram_keys(flat: np.ndarray, offsets: np.ndarray, vocab_size: int, unk_id: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(document, key) of every unigram and bigram of the documents flat[offsets[d]:offsets[d+1]]; n-grams
    never cross documents and never hold [UNK]."""
    ids = np.asarray(flat, dtype=np.int64)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    ok = ids != unk_id
    both = (doc[:-1] == doc[1:]) & ok[:-1] & ok[1:]
    bigram = vocab_size + ids[:-1][both] * vocab_size + ids[1:][both]
    return np.concatenate([doc[ok], doc[:-1][both]]), np.concatenate([ids[ok], bigram])


def _runs(doc: np.ndarray, col: np.ndarray, weight: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (doc, col) with the count (weight None) or the summed weight of each."""
    order = np.lexsort((col, doc))
    d, c = doc[order], col[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (d[1:] != d[:-1]) | (c[1:] != c[:-1])
    starts = np.flatnonzero(new)
    if weight is None:
        total = np.diff(np.append(starts, len(d))).astype(np.float64)
    else:
        total = np.add.reduceat(weight[order], starts) if len(starts) else np.zeros(0)
    return d[starts], c[starts], total


def _unit_rows(doc: np.ndarray, weight: np.ndarray, n_docs: int) -> np.ndarray:
    norm = np.sqrt(np.bincount(doc, weights=weight * weight, minlength=n_docs))
    return weight / np.where(norm > 0, norm, 1.0)[doc]


def tfidf_rows(doc: np.ndarray, col: np.ndarray, idf: np.ndarray, n_docs: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-length sublinear tf-idf rows (doc, col, weight) of n-gram occurrences given as columns."""
    d, c, tf = _runs(doc, col)
    return d, c, _unit_rows(d, (1.0 + np.log(tf)) * idf[c], n_docs)


def key_vectors(last: tuple, earlier: tuple | None, idf: np.ndarray, n_rows: int, context_weight: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of unit(unit(tfidf(last)) + context_weight * unit(tfidf(earlier))); `last` / `earlier`: (row, col)
    n-gram occurrences of each row's last turn / its earlier turns."""
    d, c, w = tfidf_rows(*last, idf, n_rows)
    if earlier is not None and context_weight > 0 and len(earlier[0]):
        d2, c2, w2 = tfidf_rows(*earlier, idf, n_rows)
        d, c, w = _runs(np.concatenate([d, d2]), np.concatenate([c, c2]), np.concatenate([w, context_weight * w2]))
    return d, c, _unit_rows(d, w, n_rows)


def split_turns(turns: Sequence[Sequence[int]], context_turns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One query's (last turn ids, [0, len]) and (earlier turn ids, their offsets): the documents it is made of."""
    last = np.asarray(turns[-1], dtype=np.int64)
    before = [np.asarray(t, dtype=np.int64) for t in turns[max(0, len(turns) - 1 - context_turns):-1]]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in before])]).astype(np.int64)
    flat = np.concatenate(before) if before else np.zeros(0, dtype=np.int64)
    return last, np.array([0, len(last)], dtype=np.int64), flat, offsets


# ---------------------------------------------------------------------------------------------- reading

CARD_FIELDS = {"format": str, "version": int, "tokenizer": dict, "settings": dict, "counts": dict,
               "sources": list, "files": dict}
# name -> (dtype, shape as names of counts or numbers; "+1" = that count + 1)
ARRAY_SPECS = {
    "terms": ("<i8", ("terms",)), "idf": ("<f4", ("terms",)), "postings_indptr": ("<i8", ("terms+1",)),
    "postings_pair": ("<i4", ("postings",)), "postings_weight": ("<f2", ("postings",)),
    "reply_ids": (None, ("reply_tokens",)), "reply_offsets": ("<i8", ("pairs+1",)),
    "reply_text": ("|u1", ("reply_text_bytes",)), "reply_text_offsets": ("<i8", ("pairs+1",)),
    "context_text": ("|u1", ("context_text_bytes",)), "context_text_offsets": ("<i8", ("pairs+1",)),
    "source": ("<u2", ("pairs",)),
}


def only_echoes(reply: str, message: str) -> bool:
    """True when `reply` says nothing but (part of) `message`: contained in it (你好 for 你好啊) or the message
    repeated (你好你好你好 for 你好), punctuation and spaces aside. Such a reply is never kept: the backward
    model rates an echo highly (the context is easy to predict from it), yet it answers nothing."""
    r, m = _letters(reply), _letters(message)
    if not r or not m:  # no words on one side: plain containment (。。。 in 好。。。 is an echo)
        return bool(reply.strip()) and reply.strip() in message
    return r in m or not r.replace(m, "")


def _letters(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def _card_error(path: Path, message: str, field: str | None = None) -> UserError:
    return UserError(f"{message}; rebuild the index with `python -m dialogpt_zh.index`", path=path, field=field)


def read_card(directory: Path) -> dict[str, Any]:
    """The checked card of an index directory (UserError naming the file for anything wrong)."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "not found"
        raise UserError(f"retrieval index {what} (a directory written by `python -m dialogpt_zh.index`)",
                        path=directory)
    path = directory / CARD
    try:
        found = path.is_file()
    except OSError as e:  # a directory without search (x) permission
        raise UserError(f"cannot read the directory: {e.strerror or e}", path=directory) from e
    if not found:
        raise UserError(f"not a retrieval index: no {CARD} (build one with `python -m dialogpt_zh.index`)",
                        path=directory)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # e.g. no read permission
        raise UserError(f"cannot read the card: {e.strerror or e}", path=path) from e
    except UnicodeDecodeError as e:
        raise _card_error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable card: {e.msg} (truncated?); rebuild the index", path=path, line=e.lineno) from e
    except (ValueError, RecursionError) as e:  # valid JSON the parser still refuses: a huge number, deep nesting
        raise _card_error(path, f"unreadable card ({type(e).__name__}: {str(e)[:80]})") from e
    if not isinstance(card, dict) or card.get("format") != INDEX_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise UserError(f"not a dialogpt_zh retrieval index card (format {found!r}, expected {INDEX_FORMAT!r})",
                        path=path, field="format")
    if card.get("version") != INDEX_VERSION:
        raise _card_error(path, f"index version {card.get('version')!r} is not supported (this code reads "
                                f"version {INDEX_VERSION})", "version")
    for key, kind in CARD_FIELDS.items():
        if not isinstance(card.get(key), kind) or isinstance(card.get(key), bool):
            raise _card_error(path, f"expected {kind.__name__}, found {type(card.get(key)).__name__}", key)
    counts = card["counts"]
    for key in ("pairs", "terms", "postings", "reply_tokens", "reply_text_bytes", "context_text_bytes",
                "vocab_size", "unk_id"):
        v = counts.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _card_error(path, f"expected a count (int >= 0), found {v!r}", f"counts.{key}")
    settings = card["settings"]
    try:
        IndexSettings(**{k: settings[k] for k in ("context_turns", "context_weight")})
    except (KeyError, TypeError, UserError) as e:
        raise _card_error(path, f"bad featurizer settings ({e})", "settings") from e
    info = card["files"].get(ARRAYS)
    if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
        raise _card_error(path, f"expected {{'bytes', 'sha256'}} of {ARRAYS}", f"files.{ARRAYS}")
    if not isinstance(card["tokenizer"].get("fingerprint"), str):
        raise _card_error(path, "expected the tokenizer's fingerprint (a string)", "tokenizer.fingerprint")
    return card


def read_arrays(directory: Path, card: dict[str, Any]) -> dict[str, np.ndarray]:
    """index.npz, checked against the card: size and sha256 (truncation, corruption), then every array's dtype
    and shape (from its header, before its data is read); never unpickles."""
    path = directory / ARRAYS
    if not path.is_file():
        raise UserError(f"missing index file (the card {CARD} is there); rebuild the index", path=path)
    expected = card["files"][ARRAYS]
    try:
        size = path.stat().st_size
        sha256 = file_sha256(path) if size == expected["bytes"] else None
    except OSError as e:  # e.g. no read permission
        raise UserError(f"cannot read: {e.strerror or e}", path=path) from e
    if size != expected["bytes"]:
        raise UserError(f"{size:,d} bytes where the card says {expected['bytes']:,d} (truncated, or from another "
                        f"build); rebuild the index", path=path)
    if sha256 != expected["sha256"]:
        raise UserError("sha256 differs from the card's (damaged, or from another build); rebuild the index",
                        path=path)
    counts = card["counts"]
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            for name, (dtype, shape) in ARRAY_SPECS.items():
                if f"{name}.npy" not in members:
                    raise UserError(f"array {name!r} missing; rebuild the index", path=path)
                want = tuple(counts[s[:-2]] + 1 if s.endswith("+1") else counts[s] for s in shape)
                # the header first: a damaged one may claim an array far too large to allocate
                with zf.open(f"{name}.npy") as f:
                    found_shape, found_dtype = _npy_header(f)
                ok_dtype = found_dtype.kind == "u" if dtype is None else found_dtype == np.dtype(dtype)
                if not ok_dtype or found_shape != want:
                    raise UserError(f"array {name!r}: expected {dtype or 'unsigned'} {list(want)}, found "
                                    f"{found_dtype} {list(found_shape)}; rebuild the index", path=path)
                with zf.open(f"{name}.npy") as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
        raise UserError(f"unreadable .npz ({e}); rebuild the index", path=path) from e
    except MemoryError as e:
        raise UserError("too large to load (the card's counts are damaged?); rebuild the index", path=path) from e
    return arrays


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npy stream, read from its header alone."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # 3.0 only differs for structured dtypes, which no array of an index has
        raise ValueError(f".npy format version {version} is not supported")
    return shape, dtype


def check_arrays(arrays: dict[str, np.ndarray], card: dict[str, Any], path: Path) -> None:
    """Values a query relies on: offsets rising within their arrays, postings pointing at pairs, ids in the
    vocabulary, sources named by the card, weights in range, texts that decode."""
    counts = card["counts"]
    for offsets, data in (("postings_indptr", "postings_pair"), ("reply_offsets", "reply_ids"),
                          ("reply_text_offsets", "reply_text"), ("context_text_offsets", "context_text")):
        o = arrays[offsets]
        if o[0] != 0 or o[-1] != len(arrays[data]) or (np.diff(o) < 0).any():
            raise UserError(f"{offsets!r} must rise from 0 to {len(arrays[data])}; rebuild the index", path=path)
    checks = [
        (len(arrays["postings_pair"]) and (arrays["postings_pair"].min() < 0
                                           or arrays["postings_pair"].max() >= counts["pairs"]),
         "a posting points past the pairs"),
        (len(arrays["reply_ids"]) and int(arrays["reply_ids"].max()) >= counts["vocab_size"],
         "a reply token id is outside the vocabulary"),
        (len(arrays["source"]) and int(arrays["source"].max()) >= len(card["sources"]),
         "a pair names a source the card does not list"),
        ((np.diff(arrays["terms"]) <= 0).any(), "terms are not sorted and distinct"),
        (not np.isfinite(arrays["postings_weight"]).all() or not np.isfinite(arrays["idf"]).all(),
         "weights are not finite"),
        # components of unit vectors of positive tf-idf; smooth idf is >= 1 (else similarities mean nothing)
        (not ((arrays["postings_weight"] >= 0) & (arrays["postings_weight"] <= 1)).all(),
         "a posting weight is outside [0, 1]"),
        (not (arrays["idf"] > 0).all(), "an idf is not positive"),
    ]
    for bad, message in checks:
        if bad:
            raise UserError(f"{message}; rebuild the index", path=path)
    for text, offsets in (("reply_text", "reply_text_offsets"), ("context_text", "context_text_offsets")):
        if not _utf8_at(arrays[text], arrays[offsets]):
            raise UserError(f"{text!r} is not UTF-8 text cut at character boundaries; rebuild the index", path=path)


def _utf8_at(blob: np.ndarray, offsets: np.ndarray) -> bool:
    """The bytes decode as UTF-8 and every offset starts a character (a query decodes texts one by one)."""
    try:
        blob.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    starts = offsets[:-1][offsets[:-1] < len(blob)]
    return not ((blob[starts] & 0xC0) == 0x80).any()  # 10xxxxxx: a continuation byte


@dataclass
class Hit:
    """One retrieved pair: its index, the similarity of its key to the query, the reply."""

    pair: int
    similarity: float
    reply_ids: list[int]
    text: str
    context: str        # the pair's last context turn, as stored
    source: str


class RetrievalIndex:
    """A loaded index: `search(turns, k)` -> the k most similar pairs. Read-only, thread-safe."""

    def __init__(self, directory: Path, card: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.card = card
        self.settings = card["settings"]
        self.vocab_size = card["counts"]["vocab_size"]
        self.unk_id = card["counts"]["unk_id"]
        self.size = card["counts"]["pairs"]
        self.source_names = [s.get("name", "?") if isinstance(s, dict) else str(s) for s in card["sources"]]
        a = arrays
        self.terms, self.idf = a["terms"], a["idf"].astype(np.float64)
        self.indptr, self.postings = a["postings_indptr"], a["postings_pair"]
        # float16 on disk; widened once here (exactly), not per query: the products are float64 either way
        self.weights = a["postings_weight"].astype(np.float64)
        self.reply_ids, self.reply_offsets = a["reply_ids"], a["reply_offsets"]
        self.reply_text, self.reply_text_offsets = a["reply_text"].tobytes(), a["reply_text_offsets"]
        self.context_text, self.context_text_offsets = a["context_text"].tobytes(), a["context_text_offsets"]
        self.source = a["source"]

    @classmethod
    def load(cls, directory: str | Path, tokenizer=None) -> "RetrievalIndex":
        """Read and check an index directory; with `tokenizer`, refuse an index built with another one."""
        directory = Path(directory)
        card = read_card(directory)
        if tokenizer is not None:
            check_tokenizer(card, tokenizer, directory / CARD)
        arrays = read_arrays(directory, card)
        check_arrays(arrays, card, directory / ARRAYS)
        return cls(directory, card, arrays)

    def reply(self, i: int) -> str:
        return self.reply_text[self.reply_text_offsets[i]:self.reply_text_offsets[i + 1]].decode("utf-8")

    def context(self, i: int) -> str:
        return self.context_text[self.context_text_offsets[i]:self.context_text_offsets[i + 1]].decode("utf-8")

    def reply_texts(self) -> set[str]:
        """Every reply of the index (for "is this a verbatim training utterance")."""
        return {self.reply(i) for i in range(self.size)}

    def query_vector(self, turns: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(term columns, weights) of a query: the turns' token ids, oldest first (the last one is matched
        against the pairs' last context turns, the ones before at the card's context_weight)."""
        last, last_off, flat, offsets = split_turns(turns, self.settings["context_turns"])
        parts = []
        for ids, off in ((last, last_off), (flat, offsets)):
            doc, key = ngram_keys(ids, off, self.vocab_size, self.unk_id)
            col = np.searchsorted(self.terms, key)
            known = col < len(self.terms)
            known[known] = self.terms[col[known]] == key[known]
            parts.append((np.zeros(int(known.sum()), dtype=np.int64), col[known]))
        if not len(parts[0][0]) and not len(parts[1][0]):
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        _, cols, weights = key_vectors(parts[0], parts[1], self.idf, 1, self.settings["context_weight"])
        return cols, weights

    def search(self, turns: Sequence[Sequence[int]], k: int) -> list[Hit]:
        """The `k` pairs most similar to the query (similarity > 0), best first; ties by pair order."""
        return [self.hit(i, similarity) for i, similarity in self.ranked(turns, k)]

    def ranked(self, turns: Sequence[Sequence[int]], k: int) -> list[tuple[int, float]]:
        """(pair, similarity) of the `k` pairs most similar to the query, as `search` orders them, without
        reading their texts (a caller that skips some builds only the hits it keeps)."""
        cols, weights = self.query_vector(turns)
        if k <= 0 or not len(cols) or not self.size:
            return []
        starts, ends = self.indptr[cols], self.indptr[cols + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if not total:
            return []
        # positions of every posting of the query's terms, term by term
        pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(total)
        scores = np.bincount(self.postings[pos], minlength=self.size,
                             weights=self.weights[pos] * np.repeat(weights, lengths))
        found = np.flatnonzero(scores > 0)
        if len(found) > k:
            found = found[np.argpartition(-scores[found], k - 1)[:k]]
        found = found[np.lexsort((found, -scores[found]))]
        return list(zip(found.tolist(), scores[found].tolist()))

    def reply_length(self, i: int) -> int:
        """Tokens of pair i's reply."""
        return int(self.reply_offsets[i + 1] - self.reply_offsets[i])

    def hit(self, i: int, similarity: float) -> Hit:
        ids = self.reply_ids[self.reply_offsets[i]:self.reply_offsets[i + 1]]
        return Hit(pair=i, similarity=similarity, reply_ids=[int(t) for t in ids], text=self.reply(i),
                   context=self.context(i), source=self.source_names[int(self.source[i])])


def check_tokenizer(card: dict[str, Any], tokenizer, where: Path) -> None:
    """The index's token ids mean the same tokens to `tokenizer`, else a UserError naming the card."""
    from dialogpt_zh.tokenizer import tokenizer_fingerprint

    if card["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise UserError(f"this index was built with another tokenizer (vocabulary {card['counts']['vocab_size']} "
                        f"tokens, fingerprint {card['tokenizer']['fingerprint'][:12]}…) than the bot's "
                        f"({len(tokenizer)} tokens, {tokenizer_fingerprint(tokenizer)[:12]}…): rebuild it from a "
                        f"token store made with `--vocab BOT_DIR/forward`", path=where, field="tokenizer")
    if card["counts"]["vocab_size"] != len(tokenizer):  # same tokenizer, yet the card's count was edited
        raise UserError(f"{card['counts']['vocab_size']} tokens where the bot's tokenizer (the same fingerprint) has "
                        f"{len(tokenizer)}: a reply token id could be past the model's vocabulary; rebuild the index",
                        path=where, field="counts.vocab_size")
