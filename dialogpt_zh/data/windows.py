"""Training windows: which consecutive utterances of a session form one training sequence, and the writer
that puts their token ids into the store's split files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dialogpt_zh.cli import raise_if_stopped
from dialogpt_zh.sequence import sequence_length
from dialogpt_zh.tokenizer import UtteranceEncoder


def make_windows(lengths: Sequence[int], max_turns: int, max_tokens: int) -> list[tuple[int, int]]:
    """Windows (start, count) over a session's utterance token lengths; see the module docstring."""
    n = len(lengths)
    if n < 2:
        return []
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, total = start, 1  # total: sequence length so far ([CLS])
        while end < n and end - start < max_turns and total + lengths[end] + 1 <= max_tokens:
            total += lengths[end] + 1
            end += 1
        if end - start < 2:  # cannot happen when every pair fits; guard against an endless loop
            raise ValueError(f"turns {start}..{start + 1} do not fit in {max_tokens} tokens")
        windows.append((start, end - start))
        if end >= n:
            return windows
        nxt = max(start + 1, end - max(1, (end - start) // 2))
        # the next window must reach at least the first turn not yet a reply (turn `end`)
        while sequence_length(lengths[nxt:end + 1]) > max_tokens or end + 1 - nxt > max_turns:
            nxt += 1
        start = nxt


def max_utterance_tokens(max_tokens: int) -> int:
    """Longest utterance (tokens) kept whole: any two consecutive turns then fit in one window."""
    return (max_tokens - 3) // 2


class WindowWriter:
    """Pass 4's work on one batch of sessions: encode, cut into windows, append to the store, count.

    Vectorised over the batch, with the same bytes and counts as session by session: sessions are appended
    to their split in input order.
    """

    def __init__(self, writer, encoder: UtteranceEncoder, corpus: CleanedCorpus, plan: SplitPlan,
                 max_turns: int, max_tokens: int, upsample: dict[str, int] | None = None) -> None:
        self.writer, self.encoder = writer, encoder
        self.labels, self.source, self.sources = plan.labels, corpus.source, corpus.sources
        # times each source's train windows are written (valid/test: once)
        self.copies = np.array([(upsample or {}).get(s, 1) for s in self.sources], dtype=np.int64)
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.max_utterance_tokens = max_utterance_tokens(max_tokens)
        self.unk_id = encoder.tokenizer.unk_token_id
        self.stats = {(s, sp): _new_stats() for s in self.sources for sp in STORE_SPLITS}
        self.tokens_truncated = 0

    def add(self, batch: list[tuple[int, list[str]]]) -> None:
        """Write a batch of (session index, turns)."""
        raise_if_stopped()
        idx = np.fromiter((i for i, _ in batch), dtype=np.int64, count=len(batch))
        nturns = np.fromiter((len(turns) for _, turns in batch), dtype=np.int64, count=len(batch))
        flat, lengths = self._encode([u for _, turns in batch for u in turns])
        first_utt = np.concatenate([[0], np.cumsum(nturns)])
        first_tok = np.concatenate([[0], np.cumsum(lengths)])
        tokens = first_tok[first_utt[1:]] - first_tok[first_utt[:-1]]
        unk_cum = np.concatenate([[0], np.cumsum(flat == self.unk_id)])
        unk = unk_cum[first_tok[first_utt[1:]]] - unk_cum[first_tok[first_utt[:-1]]]
        chars = np.fromiter((sum(map(len, turns)) for _, turns in batch), dtype=np.int64, count=len(batch))
        sess, rows, n_win = self._windows(nturns, tokens, lengths, first_utt)
        split_of, src_of = self.labels[idx], self.source[idx]
        for code, split in enumerate(STORE_SPLITS):
            in_split = split_of == code
            if not in_split.any():
                continue
            self._write(split, in_split, nturns, lengths, flat, rows, sess, src_of)
            if split == "train":
                for extra in range(1, int(self.copies.max())):  # upsampled sources, copy by copy
                    again = in_split & (self.copies[src_of] > extra)
                    if again.any():
                        self._write(split, again, nturns, lengths, flat, rows, sess, src_of)
            for si in np.unique(src_of[in_split]).tolist():
                m = in_split & (src_of == si)
                st = self.stats[(self.sources[si], split)]
                st["sessions"] += int(m.sum())
                st["windows"] += int(n_win[m].sum())
                st["utterances"] += int(nturns[m].sum())
                st["chars"] += int(chars[m].sum())
                st["tokens"] += int(tokens[m].sum())
                st["unk_tokens"] += int(unk[m].sum())
                t, c = np.unique(nturns[m], return_counts=True)
                st["turns_per_session"].update(dict(zip(t.tolist(), c.tolist())))
                t, c = np.unique(rows[m[sess], 1], return_counts=True)
                st["turns_per_window"].update(dict(zip(t.tolist(), c.tolist())))

    @property
    def upsampled(self) -> dict[str, dict[str, int]]:
        """Per upsampled source: its copies and the windows/tokens the repeats added to train (the unique
        train counts times copies - 1)."""
        out = {}
        for s, n in zip(self.sources, self.copies.tolist()):
            if n > 1:
                st = self.stats[(s, "train")]
                out[s] = {"copies": n, "windows": (n - 1) * st["windows"], "tokens": (n - 1) * st["tokens"]}
        return out

    def _write(self, split: str, chosen: np.ndarray, nturns: np.ndarray, lengths: np.ndarray, flat: np.ndarray,
               rows: np.ndarray, sess: np.ndarray, src_of: np.ndarray) -> None:
        """Append the `chosen` sessions of the batch (a mask) with their windows (and each window's source,
        `src_of` per session) to `split`."""
        utt_mask = np.repeat(chosen, nturns)
        tok_mask = np.repeat(utt_mask, lengths)
        base = np.cumsum(np.where(chosen, nturns, 0)) - nturns  # first utterance in this split's part
        w = chosen[sess]
        self.writer.add_sessions(split, flat[tok_mask], lengths[utt_mask],
                                 rows[w] + np.stack([base[sess[w]], np.zeros(int(w.sum()), np.int64)], 1),
                                 src_of[sess[w]] if getattr(self.writer, "sources", None) is not None else None)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, utterance lengths), long utterances cut to max_utterance_tokens (so that two
        turns always fit in a window)."""
        flat, offsets = self.encoder.encode(texts)
        lengths = np.diff(offsets)
        over = lengths > self.max_utterance_tokens
        if over.any():
            self.tokens_truncated += int(over.sum())
            pos = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
            flat = flat[pos < self.max_utterance_tokens]
            lengths = np.minimum(lengths, self.max_utterance_tokens)
        return flat, lengths

    def _windows(self, nturns: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, first_utt: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of the batch as (session of each window, rows (first turn, count), windows per session);
        a session that fits whole is one window (what make_windows returns for it)."""
        n = len(nturns)
        whole = (nturns <= self.max_turns) & (1 + tokens + nturns <= self.max_tokens)
        if whole.all():
            return np.arange(n), np.stack([np.zeros(n, np.int64), nturns], 1), np.ones(n, dtype=np.int64)
        whole_idx = np.flatnonzero(whole)
        win_sess, win_rows = [whole_idx], [np.stack([np.zeros(len(whole_idx), np.int64), nturns[whole_idx]], 1)]
        for b in np.flatnonzero(~whole).tolist():
            ws = make_windows(lengths[first_utt[b]:first_utt[b + 1]].tolist(), self.max_turns, self.max_tokens)
            win_sess.append(np.full(len(ws), b))
            win_rows.append(np.array(ws, dtype=np.int64).reshape(-1, 2))
        sess, rows = np.concatenate(win_sess), np.concatenate(win_rows)
        order = np.argsort(sess, kind="stable")  # windows in session order
        return sess[order], rows[order], np.bincount(sess, minlength=n)




STORE_SPLITS = ("train", "valid", "test")


def _new_stats() -> dict[str, Any]:
    return {"sessions": 0, "windows": 0, "utterances": 0, "chars": 0, "tokens": 0, "unk_tokens": 0,
            "turns_per_session": Counter(), "turns_per_window": Counter()}


def _finish_stats(st: dict[str, Any]) -> dict[str, Any]:
    out = dict(st)
    out["unk_rate"] = st["unk_tokens"] / st["tokens"] if st["tokens"] else 0.0
    for k in ("turns_per_session", "turns_per_window"):
        out[k] = {str(t): c for t, c in sorted(st[k].items())}
    return out


def _total(counters: dict[str, Counter]) -> Counter:
    total: Counter = Counter()
    for c in counters.values():
        total.update(c)  # (Counter + Counter would drop the zero counts the manifest lists)
    return total


def _add_stats(into: dict[str, Any], st: dict[str, Any]) -> None:
    for k, v in st.items():
        if isinstance(v, Counter):
            into[k].update(v)
        else:
            into[k] += v


@dataclass
class CleanedCorpus:
    """Pass 1's result: the cleaned sessions in a temp file (one per line, turns joined by TAB) and, per
    session, only what dedupe and split need (memory stays flat however big the corpus)."""

    path: Path
    sources: list[str]
    hashes: np.ndarray          # int64 hash of the cleaned session text
    source: np.ndarray          # uint16 index into `sources`
    own_split: np.ndarray       # int16 index into `split_names` (-1: the session's source names no split)
    split_names: dict[str, int]
    counters: dict[str, Counter]  # per source, by reason
    inputs_info: list[dict]
    chars: int

    def __len__(self) -> int:
        return len(self.source)

    def count_per_source(self, mask: np.ndarray, reason: str) -> None:
        """Add the sessions in `mask` to each source's counter `reason`."""
        for si, count in enumerate(np.bincount(self.source[mask], minlength=len(self.sources))):
            if count:
                self.counters[self.sources[si]][reason] += int(count)


@dataclass
class SplitPlan:
    """Pass 2's result: where each cleaned session goes."""

    labels: np.ndarray  # int8 per session: 0 train, 1 valid, 2 test, -1 left out (duplicate or held out)
    holdout: list[str]
    holdout_not_found: list[str]
    subsampled: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return int((self.labels >= 0).sum())


