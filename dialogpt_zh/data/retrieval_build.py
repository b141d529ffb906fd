"""Building a retrieval index (`python -m dialogpt_zh.index`) from the TRAIN split of a token store.

Pairs: every utterance that is a reply in some train window (the window giving it the most context), with
up to `context_turns` turns before its last context turn. Held-out sessions (valid / test) never enter it,
and neither does a train pair equal to a held-out one (same last turn and reply). Each pair is counted in
exactly one reason when left out (`DROP_REASONS`, in the order they are checked). The format: retrieval.py.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dialogpt_zh.data.retrieval import (
    ARRAYS,
    CARD,
    INDEX_FORMAT,
    INDEX_VERSION,
    IndexSettings,
    file_sha256,
    key_vectors,
    ngram_keys,
    only_echoes,
)
from dialogpt_zh.data.store import MANIFEST, StoreSplit, TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import check_output_name

DROP_REASONS = ("excluded_source", "reply_has_unk", "reply_too_short", "reply_too_long", "reply_blocklisted",
                "reply_echoes_context", "same_as_held_out", "duplicate")


def split_pairs(split: StoreSplit, context_turns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reply utterance, first context utterance, window) of every utterance that is a reply (not the first
    turn) in some window of `split`: from the window that gives it the most context, cut to the last turn
    plus `context_turns` before it."""
    win = split.win
    n_rep = win[:, 1] - 1
    w_idx = np.repeat(np.arange(len(win), dtype=np.int64), n_rep)
    pos = np.arange(int(n_rep.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_rep) - n_rep, n_rep) + 1
    reply = win[w_idx, 0] + pos
    start = win[w_idx, 0]
    order = np.lexsort((w_idx, start, reply))
    reply, start, w_idx = reply[order], start[order], w_idx[order]
    first = np.ones(len(reply), dtype=bool)
    first[1:] = reply[1:] != reply[:-1]
    reply, start, w_idx = reply[first], start[first], w_idx[first]
    return reply, np.maximum(start, reply - 1 - context_turns), w_idx


def _utterance(split: StoreSplit, u: int) -> np.ndarray:
    return split.ids[split.utt[u]:split.utt[u + 1]]


def held_out_pairs(store: TokenStore) -> set[tuple[bytes, bytes]]:
    """(last turn, reply) token bytes of every pair in the store's other splits (valid, test)."""
    out: set[tuple[bytes, bytes]] = set()
    for name in store.split_names():
        if name == "train":
            continue
        split = store.split(name)
        reply, _, _ = split_pairs(split, 0)
        dtype = np.dtype("<u4")  # one width for every split, so equal ids give equal bytes
        out.update((_utterance(split, u - 1).astype(dtype).tobytes(), _utterance(split, u).astype(dtype).tobytes())
                   for u in reply.tolist())
    return out


class PairFilter:
    """Decides, pair by pair, whether it goes into the index; counts every drop by reason and source."""

    def __init__(self, settings: IndexSettings, blocklist: list[str], held_out: set[tuple[bytes, bytes]],
                 excluded: set[int], unk_id: int, decode) -> None:
        self.settings, self.blocklist, self.held_out = settings, blocklist, held_out
        self.excluded, self.unk_id, self.decode = excluded, unk_id, decode
        self.seen: set[tuple[bytes, bytes]] = set()
        self.dropped: Counter = Counter()
        self.by_source: dict[int, Counter] = {}

    def check(self, last: np.ndarray, reply: np.ndarray, source: int) -> tuple[str, str] | None:
        """(reply text, last turn text) of a pair to keep, else None (the reason counted)."""
        reason, texts = self._reason(last, reply, source)
        counter = self.by_source.setdefault(source, Counter())
        counter["read"] += 1
        if reason is None:
            counter["kept"] += 1
            return texts
        self.dropped[reason] += 1
        counter[reason] += 1
        return None

    def _reason(self, last: np.ndarray, reply: np.ndarray, source: int):
        s = self.settings
        if source in self.excluded:
            return "excluded_source", None
        if (reply == self.unk_id).any():
            return "reply_has_unk", None
        text = self.decode(reply)
        if len(text) < s.min_reply_chars:
            return "reply_too_short", None
        if len(text) > s.max_reply_chars:
            return "reply_too_long", None
        if any(w in text for w in self.blocklist):
            return "reply_blocklisted", None
        last_text = self.decode(last)
        if only_echoes(text, last_text):
            return "reply_echoes_context", None
        key = (last.astype("<u4").tobytes(), reply.astype("<u4").tobytes())
        if key in self.held_out:
            return "same_as_held_out", None
        if key in self.seen:
            return "duplicate", None
        self.seen.add(key)
        return None, (text, last_text)


def _blob(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return np.frombuffer(b"".join(data), dtype=np.uint8).copy(), offsets


def _concat(parts: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
    return flat, offsets


def vectorize(lasts: list[np.ndarray], earlier: list[list[np.ndarray]], vocab_size: int, unk_id: int,
              context_weight: float) -> dict[str, np.ndarray]:
    """Fit the featurizer on the pairs' contexts and write their key vectors as an inverted index."""
    n = len(lasts)
    flat, off = _concat(lasts, np.int64)
    last_doc, last_key = ngram_keys(flat, off, vocab_size, unk_id)
    turns = [t for ts in earlier for t in ts]
    owner = np.repeat(np.arange(n, dtype=np.int64), [len(ts) for ts in earlier])
    flat, off = _concat(turns, np.int64)
    doc, early_key = ngram_keys(flat, off, vocab_size, unk_id)
    early_doc = owner[doc]
    terms = np.unique(np.concatenate([last_key, early_key]))
    last_col, early_col = np.searchsorted(terms, last_key), np.searchsorted(terms, early_key)
    # document frequency: the pairs whose key (last turn or earlier turns) holds the term
    both = np.unique(np.concatenate([last_doc, early_doc]) * len(terms) + np.concatenate([last_col, early_col]))
    df = np.bincount(both % len(terms), minlength=len(terms)) if len(terms) else np.zeros(0, np.int64)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    row, col, weight = key_vectors((last_doc, last_col), (early_doc, early_col), idf, n, context_weight)
    order = np.lexsort((row, col))
    indptr = np.zeros(len(terms) + 1, dtype=np.int64)
    np.cumsum(np.bincount(col, minlength=len(terms)), out=indptr[1:])
    return {"terms": terms.astype("<i8"), "idf": idf.astype("<f4"), "postings_indptr": indptr,
            "postings_pair": row[order].astype("<i4"), "postings_weight": weight[order].astype("<f2")}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A deflated .npz (about half the size; inflating stays well inside the load budget, docs/retrieval.md)
    with fixed zip timestamps, so the same index gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED  # a ZipInfo does not take the archive's default
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _sources(store: TokenStore, names: list[str], filt: PairFilter) -> list[dict[str, Any]]:
    """The card's sources: name, pairs kept, licence, as the store's manifest records them."""
    corpora = store.manifest.get("corpora", [])  # a list of objects: checked by TokenStore
    by_name = {c.get("source"): c for c in corpora if c.get("source")}
    if not by_name and len(corpora) == len(names):  # manifests before corpora named their source: same order
        by_name = dict(zip(names, corpora))
    out = []
    for i, name in enumerate(names):
        c = by_name.get(name, {})
        counts = filt.by_source.get(i, Counter())
        out.append({"name": name, "pairs": counts["kept"], "pairs_read": counts["read"],
                    "excluded": i in filt.excluded, "licence": c.get("licence", "not recorded in the store"),
                    "licence_file": c.get("licence_file"), "path": c.get("path"),
                    "dropped": {r: counts[r] for r in DROP_REASONS if counts[r]}})
    return out


def _excluded(store: TokenStore, settings: IndexSettings) -> tuple[list[str], np.ndarray | None, set[int]]:
    """Source names, each train window's source (None when the store does not record it), and the indices
    of the excluded sources (an unknown name, or excluding from a version 1 store, is an error)."""
    train = store.split("train")
    if settings.exclude_sources:
        src = train.window_sources()  # a version 1 store: the error says to re-run the preprocessor
        unknown = sorted(set(settings.exclude_sources) - set(store.sources))
        if unknown:
            raise UserError(f"no source named {', '.join(map(repr, unknown))} in the store (its sources: "
                            f"{', '.join(store.sources)})", field="exclude_sources")
        return store.sources, src, {store.sources.index(s) for s in settings.exclude_sources}
    if store.sources is not None:
        return store.sources, train.window_sources(), set()
    return ["(not recorded: store version 1)"], None, set()


def check_output(output: Path, overwrite: bool) -> None:
    """The index may go to `output`: nothing there, an empty directory, or (with --overwrite) an index."""
    check_output_name(output, "output")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise UserError("exists and is not a directory; refusing to replace it", path=output, field="output")
        if any(output.iterdir()):
            if not overwrite:
                raise UserError("exists; pass --overwrite to replace it", path=output, field="output")
            if not (output / CARD).is_file():
                raise UserError(f"exists and is not a retrieval index (no {CARD}); refusing to replace it, even "
                                f"with --overwrite", path=output, field="output")


def check_apart(store: Path, output: Path) -> None:
    """The index never goes into its input: --output is neither the store, nor inside it, nor above it."""
    s, o = store.resolve(), output.resolve()
    if o == s or s in o.parents:
        raise UserError(f"is {'' if o == s else 'inside '}the token store {store} (--data), an input; write the index "
                        f"elsewhere, e.g. BOT_DIR/retrieval", path=output, field="output")
    if o in s.parents:
        raise UserError(f"holds the token store {store} (--data), an input; write the index elsewhere",
                        path=output, field="output")


def build_index(store_path: str | Path, output: str | Path, settings: IndexSettings, command: str,
                overwrite: bool = False) -> dict[str, Any]:
    """Build the index of the store's train split into the directory `output` (written whole or not at all);
    returns the card."""
    from dialogpt_zh.data.cleaning import load_blocklist, normalize_many
    from dialogpt_zh.fsutil import atomic_directory
    from dialogpt_zh.tokenizer import fast_decoder, tokenizer_fingerprint

    t0 = time.perf_counter()
    output = Path(output)
    check_apart(Path(store_path), output)
    check_output(output, overwrite)  # before the work, not after
    store = TokenStore(store_path)
    store.nonempty_split("train")  # missing or empty: said now, not as "no pair left"
    tokenizer = store.tokenizer()
    names, window_source, excluded = _excluded(store, settings)
    config = store.manifest.get("config", {})  # its types checked by TokenStore
    words = []
    if settings.blocklist:  # normalised as the store's text was, so a word matches what is stored
        words = [w for w in normalize_many(load_blocklist(settings.blocklist),
                                           max_repeat=config.get("max_repeat", 4),
                                           mask_pii=config.get("mask_pii", True)) if w.strip()]
    unk = tokenizer.unk_token_id
    filt = PairFilter(settings, words, held_out_pairs(store), excluded, unk, fast_decoder(tokenizer))
    train = store.split("train")
    reply_u, start_u, w_idx = split_pairs(train, settings.context_turns)
    srcs = window_source[w_idx] if window_source is not None else np.zeros(len(reply_u), dtype=np.int64)
    kept: dict[str, list] = {"last": [], "earlier": [], "reply": [], "text": [], "context": [], "source": []}
    for u, s, src in zip(reply_u.tolist(), start_u.tolist(), srcs.tolist()):
        last, reply = _utterance(train, u - 1), _utterance(train, u)
        texts = filt.check(last, reply, src)
        if texts is None:
            continue
        kept["last"].append(last)
        kept["earlier"].append([_utterance(train, v) for v in range(s, u - 1)])
        kept["reply"].append(reply)
        kept["text"].append(texts[0])
        kept["context"].append(texts[1])
        kept["source"].append(src)
    if not kept["reply"]:
        raise UserError(f"no pair left for the index (of {len(reply_u)} train pairs: "
                        f"{dict(filt.dropped)})", path=store.path)
    arrays = vectorize(kept["last"], kept["earlier"], len(tokenizer), unk, settings.context_weight)
    arrays["reply_ids"], arrays["reply_offsets"] = _concat(kept["reply"], train.ids.dtype)
    arrays["reply_text"], arrays["reply_text_offsets"] = _blob(kept["text"])
    arrays["context_text"], arrays["context_text_offsets"] = _blob(kept["context"])
    arrays["source"] = np.asarray(kept["source"], dtype="<u2")
    counts = {"pairs": len(kept["reply"]), "terms": len(arrays["terms"]), "postings": len(arrays["postings_pair"]),
              "reply_tokens": len(arrays["reply_ids"]), "reply_text_bytes": len(arrays["reply_text"]),
              "context_text_bytes": len(arrays["context_text"]), "vocab_size": len(tokenizer), "unk_id": unk,
              "train_pairs_read": len(reply_u), "held_out_pairs": len(filt.held_out), "blocklist_words": len(words),
              "dropped": {r: filt.dropped[r] for r in DROP_REASONS}}
    card = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                      "what": "sha256 of the vocabulary (tokens in id order) and the special token ids "
                              "(dialogpt_zh.tokenizer.tokenizer_fingerprint); the bot's must match"},
        "store": {"path": str(store.path), "split": "train", "store_version": store.manifest.get("version"),
                  "manifest_sha256": hashlib.sha256((store.path / MANIFEST).read_bytes()).hexdigest()},
        "settings": asdict(settings),
        "featurizer": {"units": "token ids (characters, for a char tokenizer)", "ngrams": [1, 2],
                       "tf": "1 + ln(tf)", "idf": "ln((1 + pairs) / (1 + df)) + 1",
                       "key": "unit(unit(tfidf(last turn)) + context_weight * unit(tfidf(earlier turns)))"},
        "counts": counts,
        "sources": _sources(store, names, filt),
        "command": command,
        "files": {},
    }
    with atomic_directory(output, replace_existing=overwrite) as tmp:
        write_npz(tmp / ARRAYS, arrays)
        card["files"][ARRAYS] = {"bytes": (tmp / ARRAYS).stat().st_size, "sha256": file_sha256(tmp / ARRAYS)}
        # plain writes: the directory as a whole is put in place atomically
        (tmp / CARD).write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    card["_seconds"] = time.perf_counter() - t0  # not in the file: varies per run
    return card


def summary(card: dict[str, Any]) -> str:
    """What the build kept and dropped, per reason and per source, for the terminal."""
    c = card["counts"]
    lines = [f"pairs kept: {c['pairs']:,d} of {c['train_pairs_read']:,d} train pairs "
             f"({c['held_out_pairs']:,d} held-out pairs checked against); {c['terms']:,d} n-gram terms, "
             f"{c['postings']:,d} postings; {card['files'][ARRAYS]['bytes'] / 1e6:.1f} MB",
             "dropped (each pair counted once, by the first reason that applies):"]
    lines += [f"  {reason:24s} {n:>10,d}" for reason, n in c["dropped"].items()]
    lines.append("sources:")
    for s in card["sources"]:
        what = " (excluded)" if s["excluded"] else ""
        lines.append(f"  {s['name']:24s} {s['pairs']:>10,d} of {s['pairs_read']:>10,d} pairs  licence: "
                     f"{s['licence']}{what}")
    return "\n".join(lines)
