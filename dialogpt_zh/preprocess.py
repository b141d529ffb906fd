"""Preprocessor: corpus files -> clean sessions -> dedupe -> split -> tokenizer -> windows -> token store.

    python -m dialogpt_zh.preprocess ../shared/corpus/lccc-sample ../shared/corpus/kdconv --output data/base

Passes (memory stays flat: sessions go to a temp file inside the output's temp directory):
1. read + clean every input (dialogpt_zh.readers / dialogpt_zh.cleaning), write each session as one line
   of the temp file and keep only an 8-byte hash, a source id and a split code per session;
2. drop exact duplicate sessions (same cleaned turns, anywhere in the inputs; the first is kept), then
   split by session (scikit-learn `train_test_split`, `--seed`, stratified by source when possible),
   or keep a source's own split (`--keep-source-splits`);
3. build a char tokenizer from the train split's characters (or load `--vocab`);
4. tokenize (the fast tokenizer's `encode_batch`), cut each session into windows, write the store
   (dialogpt_zh.store.StoreWriter) inside `fsutil.atomic_directory`, so a failed run leaves no half store.

Windowing rule (`make_windows`): a window is a run of consecutive turns, at most `--max-turns` turns and
at most `--max-tokens` tokens as a sequence ([CLS] + turns + one [SEP] each). Windows are taken greedily
from the start of the session, each as long as the limits allow; the next window starts half a window
back (at least one turn of overlap, and never before the previous start + 1). So every utterance after
the first is a reply (a turn after the window's first, which the model learns with the turns before it as
context) in some window, and the windows' later halves see at least half a window of context. An utterance longer than
(max_tokens - 3) // 2 tokens is cut to that length (counted `utterance_tokens_truncated`) so that any two
consecutive turns fit; with the defaults (120 chars, 256 tokens) this never happens for the char tokenizer.
"""
from __future__ import annotations

import hashlib
import logging
import shlex
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dialogpt_zh.cleaning import CleaningOptions, load_blocklist
from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_directory
from dialogpt_zh.readers import FORMATS, InputScan, iter_clean_file, scan_inputs
from dialogpt_zh.sequence import sequence_length

log = logging.getLogger(__name__)

STORE_SPLITS = ("train", "valid", "test")
SOURCE_SPLIT_CODES = {"train": 0, "valid": 1, "validation": 1, "val": 1, "dev": 1, "test": 2}
# counters that mean something was dropped (the others count changes)
DROP_REASONS = ("utterance_empty_dropped", "utterance_not_text", "session_too_short", "turns_in_short_sessions",
                "session_blocklisted", "turns_in_blocklisted_sessions", "session_duplicate", "record_malformed",
                "line_malformed", "files_skipped", "url_removed", "session_held_out",
                "session_same_as_held_out")


@dataclass
class PreprocessArguments:
    output: str = field(metadata=field_help("output store directory (replaced atomically when the run succeeds)"))
    format: str = field(default="auto", metadata=field_help(
        f"input format: auto (by extension and content) or one of {', '.join(FORMATS)}"))
    max_turns: int = field(default=8, metadata=field_help("most turns in one window"))
    max_tokens: int = field(default=256, metadata=field_help(
        "most tokens in one window sequence, [CLS] and [SEP]s included (<= the model's n_positions)"))
    max_utterance_chars: int = field(default=120, metadata=field_help("longer utterances are truncated"))
    max_repeat: int = field(default=4, metadata=field_help("runs of one repeated character are capped at this"))
    min_turns: int = field(default=2, metadata=field_help("sessions with fewer turns are dropped"))
    mask_pii: bool = field(default=True, metadata=field_help("mask phone numbers, e-mails, ID-card numbers"))
    min_frequency: int = field(default=1, metadata=field_help(
        "characters seen fewer times in the train split become [UNK] (char tokenizer only)"))
    vocab: str | None = field(default=None, metadata=field_help(
        "reuse this BERT-style vocab.txt (e.g. ../shared/corpus/vocab/gpt2-chitchat-vocab.txt) or tokenizer "
        "directory instead of building a char vocabulary"))
    seed: int = field(default=42, metadata=field_help("random seed of the train/valid/test split"))
    valid_ratio: float = field(default=0.05, metadata=field_help("share of sessions for the valid split"))
    test_ratio: float = field(default=0.05, metadata=field_help("share of sessions for the test split"))
    keep_source_splits: bool = field(default=False, metadata=field_help(
        "sessions whose source names a split (toy_valid.txt, dev.json, the keys of toy_data.json) keep it "
        "(train; valid/val/dev -> valid; test); the others are split at random"))
    holdout_source_splits: str = field(default="", metadata=field_help(
        "comma list of source split names (e.g. 'valid,test') whose sessions are left out of the store "
        "entirely, so an evaluation on those files is held out (counted as session_held_out)"))
    blocklist: str | None = field(default=None, metadata=field_help(
        "file of words (one per line): sessions containing any of them are dropped"))
    batch_sessions: int = field(default=2000, metadata=field_help("sessions tokenized per batch"))
    progress: bool = field(default=True, metadata=field_help("show tqdm progress bars"))


def validate(args: PreprocessArguments) -> None:
    if args.format != "auto" and args.format not in FORMATS:
        raise UserError(f"unknown format {args.format!r}; choose auto or one of {', '.join(FORMATS)}",
                        field="format")
    if args.max_turns < 2:
        raise UserError("must be at least 2 (a context and a reply)", field="max_turns")
    if args.max_tokens < 5:
        raise UserError("must be at least 5", field="max_tokens")
    for name in ("valid_ratio", "test_ratio"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError("must be in [0, 1)", field=name)
    if args.valid_ratio + args.test_ratio >= 1.0:
        raise UserError("valid_ratio + test_ratio must be below 1", field="valid_ratio")
    if args.min_frequency < 1:
        raise UserError("must be at least 1", field="min_frequency")
    if args.batch_sessions < 1:
        raise UserError("must be at least 1", field="batch_sessions")


# ---------------------------------------------------------------- windows

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


# ---------------------------------------------------------------- split

def split_indices(n: int, valid_ratio: float, test_ratio: float, seed: int,
                  strata: np.ndarray | None = None) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) for n sessions; deterministic for a seed."""
    from sklearn.model_selection import train_test_split

    codes = np.zeros(n, dtype=np.int8)
    n_hold = int(round(n * (valid_ratio + test_ratio)))
    n_test = int(round(n * test_ratio))
    if n_hold == 0 or n_hold >= n:
        return codes
    idx = np.arange(n)

    def tts(items, size, labels):
        try:
            return train_test_split(items, test_size=size, random_state=seed, shuffle=True, stratify=labels)
        except ValueError:  # a stratum too small to split: fall back to a plain random split
            return train_test_split(items, test_size=size, random_state=seed, shuffle=True)

    _, hold = tts(idx, n_hold, strata)
    hold = np.sort(hold)
    if n_test >= n_hold:
        codes[hold] = 2
    elif n_test == 0:
        codes[hold] = 1
    else:
        valid, test = tts(hold, n_test, strata[hold] if strata is not None else None)
        codes[valid] = 1
        codes[test] = 2
    return codes


# ---------------------------------------------------------------- helpers

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def session_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def load_tokenizer_for(args: PreprocessArguments):
    from dialogpt_zh.tokenizer import load_tokenizer, load_vocab_tokenizer

    path = Path(args.vocab)
    if path.is_dir():
        return load_tokenizer(path)
    return load_vocab_tokenizer(path)


class UtteranceEncoder:
    """Token ids of many utterances at once: (flat ids, offsets), utterance k = flat[off[k]:off[k+1]].

    For a char tokenizer built by `build_char_tokenizer` the ids are looked up with one numpy table over
    code points (its pipeline is NFKC + lowercase + one token per non-space character, and our text is
    already NFKC); this is checked against the real tokenizer on the first batch and on `verify_every`-th
    batch after, falling back to `encode_batch` if they ever differ. Other tokenizers (a BERT vocab) always
    go through the fast tokenizer's `encode_batch`.
    """

    def __init__(self, tokenizer, dtype: np.dtype, char_level: bool, verify_every: int = 50) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.table = None
        self.verify_every = verify_every
        self.batches = 0
        self.fallback_reason: str | None = None
        if char_level:
            unk = tokenizer.unk_token_id
            table = np.full(0x110000, unk, dtype=np.int64)
            for tok, i in tokenizer.get_vocab().items():
                if len(tok) == 1:
                    table[ord(tok)] = i
            for cp in range(0x3000 + 1):  # whitespace (all of it lies below U+3001) is not a token
                if chr(cp).isspace():
                    table[cp] = -1
            self.table = table

    def _table_encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        joined = "\n".join(texts).lower()
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        ids = self.table[cps]
        keep = ids >= 0
        # utterance boundaries: the "\n" separators (utterances hold no newline after normalize_text)
        bounds = np.concatenate([[0], np.flatnonzero(cps == 10) + 1, [len(cps) + 1]])
        csum = np.concatenate([[0], np.cumsum(keep)])
        offsets = csum[np.minimum(bounds, len(cps))]
        return ids[keep].astype(self.dtype), offsets

    def _generic_encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            seqs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            seqs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in seqs], out=offsets[1:])
        flat = np.fromiter((i for x in seqs for i in x), dtype=self.dtype, count=int(offsets[-1]))
        return flat, offsets

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.table is None:
            return self._generic_encode(texts)
        flat, offsets = self._table_encode(texts)
        if self.batches % self.verify_every == 0:
            ref_flat, ref_off = self._generic_encode(texts)
            if not (np.array_equal(ref_off, offsets) and np.array_equal(ref_flat, flat)):
                self.fallback_reason = "fast char lookup differed from the tokenizer; using encode_batch"
                log.warning(self.fallback_reason)
                self.table = None
                flat, offsets = ref_flat, ref_off
        self.batches += 1
        return flat, offsets


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, mininterval=0.5, **kw)


def args_to_argv(args: PreprocessArguments, inputs: Sequence[str]) -> list[str]:
    """A command line that reproduces `args` (flags only where they differ from the defaults)."""
    argv = [str(p) for p in inputs]
    defaults = PreprocessArguments(output="")
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name == "output":
            argv += ["--output", str(value)]
        elif value != getattr(defaults, f.name) and f.name != "progress":
            flag = "--" + f.name
            if isinstance(value, bool):
                argv += [flag if value else f"--no_{f.name}"]
            else:
                argv += [flag, str(value)]
    return argv


def _new_stats() -> dict[str, Any]:
    return {"sessions": 0, "windows": 0, "utterances": 0, "chars": 0, "tokens": 0, "unk_tokens": 0,
            "turns_per_session": Counter(), "turns_per_window": Counter()}


def _finish_stats(st: dict[str, Any]) -> dict[str, Any]:
    out = dict(st)
    out["unk_rate"] = st["unk_tokens"] / st["tokens"] if st["tokens"] else 0.0
    for k in ("turns_per_session", "turns_per_window"):
        out[k] = {str(t): c for t, c in sorted(st[k].items())}
    return out


def _add_stats(into: dict[str, Any], st: dict[str, Any]) -> None:
    for k, v in st.items():
        if isinstance(v, Counter):
            into[k].update(v)
        else:
            into[k] += v


# ---------------------------------------------------------------- pipeline

def run_preprocess(args: PreprocessArguments, inputs: Sequence[str | Path],
                   command: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest written to `args.output`/manifest.json."""
    from dialogpt_zh.store import StoreWriter
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    validate(args)
    if not inputs:
        raise UserError("no inputs given", field="inputs")
    t0 = time.perf_counter()
    blocklist = load_blocklist(args.blocklist) if args.blocklist else ()
    options = CleaningOptions(max_utterance_chars=args.max_utterance_chars, max_repeat=args.max_repeat,
                              min_turns=args.min_turns, mask_pii=args.mask_pii, blocklist=blocklist)
    scans: list[InputScan] = scan_inputs(inputs, args.format)  # fails before anything is written
    given_tokenizer = load_tokenizer_for(args) if args.vocab else None
    if command is None:
        command = "python -m dialogpt_zh.preprocess " + shlex.join(args_to_argv(args, inputs))
    sources = [s.source for s in scans]
    max_utt_tokens = (args.max_tokens - 3) // 2

    with atomic_directory(args.output) as out:
        tmp_path = out / "sessions.tmp"
        hashes, src_ids, src_splits = array("q"), array("H"), array("h")
        split_name_index: dict[str, int] = {}  # a source's own split name -> small int in src_splits
        counters = {s: Counter() for s in sources}
        inputs_info = []
        chars_read = 0
        # ---- pass 1: read + clean -> temp file
        with open(tmp_path, "w", encoding="utf-8", newline="\n") as tmp, \
                _progress(args.progress, desc="read+clean", unit=" sessions") as bar:
            for si, scan in enumerate(scans):
                c = counters[scan.source]
                c["files_skipped"] += len(scan.skipped)
                info = {"path": str(scan.path), "source": scan.source, "files": [], "skipped_files": scan.skipped}
                for cf in scan.files:
                    before = c["sessions_read"]
                    kept = 0
                    for s in iter_clean_file(cf, options, c):
                        text = "\t".join(s.turns)
                        tmp.write(text)
                        tmp.write("\n")
                        hashes.append(session_hash(text))
                        src_ids.append(si)
                        src_splits.append(split_name_index.setdefault(s.split, len(split_name_index))
                                          if s.split else -1)
                        chars_read += len(text) - len(s.turns) + 1
                        kept += 1
                        if kept % 1000 == 0:
                            bar.update(1000)
                    bar.update(kept % 1000)
                    info["files"].append({"path": str(cf.path), "format": cf.format, "split": cf.split,
                                          "size": cf.path.stat().st_size, "sha256": file_sha256(cf.path),
                                          "sessions_read": c["sessions_read"] - before,
                                          "sessions_cleaned": kept})
                inputs_info.append(info)
        n = len(hashes)
        if n == 0:
            raise UserError("no sessions left after cleaning (see the counts above); nothing to write",
                            path=scans[0].path)
        t_read = time.perf_counter() - t0

        # ---- dedupe (first occurrence kept) and split
        h = np.frombuffer(hashes, dtype=np.int64)
        src = np.frombuffer(src_ids, dtype=np.uint16)
        _, first = np.unique(h, return_index=True)
        keep = np.zeros(n, dtype=bool)
        keep[first] = True
        for si, count in enumerate(np.bincount(src[~keep], minlength=len(sources))):
            if count:
                counters[sources[si]]["session_duplicate"] += int(count)
        own_names = np.frombuffer(src_splits, dtype=np.int16)
        holdout = sorted({x.strip() for x in args.holdout_source_splits.split(",") if x.strip()})
        holdout_unmatched = [name for name in holdout if name not in split_name_index]
        if holdout_unmatched:
            log.warning("--holdout-source-splits: no input has a source split named %s (seen: %s); "
                        "names must match exactly (dev is not valid)", ", ".join(holdout_unmatched),
                        ", ".join(sorted(split_name_index)) or "none")
        if holdout:
            in_holdout = np.isin(own_names, [i for name, i in split_name_index.items() if name in holdout])
            held = keep & in_holdout
            # a session equal to a held-out one (a duplicate in another file) is left out too, whichever
            # came first, so that no held-out session is ever trained on
            same = keep & ~in_holdout & np.isin(h, h[in_holdout])
            for name, mask in (("session_held_out", held), ("session_same_as_held_out", same)):
                for si, count in enumerate(np.bincount(src[mask], minlength=len(sources))):
                    if count:
                        counters[sources[si]][name] += int(count)
            keep &= ~(held | same)
            del in_holdout, held, same
            if not keep.any():
                raise UserError("every session is in a held-out source split; nothing left to train on",
                                field="holdout_source_splits")
        del h, first
        labels = np.full(n, -1, dtype=np.int8)
        if args.keep_source_splits:
            code_of = np.full(len(split_name_index) + 1, -1, dtype=np.int8)  # the last entry: no split (-1)
            for name, i in split_name_index.items():
                code_of[i] = SOURCE_SPLIT_CODES.get(name, -1)
            own = code_of[own_names]
            labels[keep & (own >= 0)] = own[keep & (own >= 0)]
        free = np.flatnonzero(keep & (labels < 0))
        if len(free):
            labels[free] = split_indices(len(free), args.valid_ratio, args.test_ratio, args.seed, src[free])
        labels[~keep] = -1
        del hashes, src_splits

        # ---- pass 2: tokenizer
        if given_tokenizer is not None:
            tokenizer = given_tokenizer
            tok_info = {"kind": "vocab", "vocab": str(args.vocab)}
            if Path(args.vocab).is_file():
                tok_info["vocab_sha256"] = file_sha256(Path(args.vocab))
        else:
            char_counts: Counter = Counter()
            chunk: list[str] = []
            with open(tmp_path, encoding="utf-8") as tmp:
                for i, line in enumerate(tmp):
                    if labels[i] == 0:
                        chunk.append(line)
                        if len(chunk) >= 5000:
                            count_chars(["".join(chunk)], char_counts)
                            chunk = []
            count_chars(["".join(chunk)], char_counts)
            if not char_counts:
                raise UserError("the train split is empty; lower --valid_ratio/--test_ratio or add data",
                                field="valid_ratio")
            tokenizer = build_char_tokenizer(char_counts, args.min_frequency)
            tok_info = {"kind": "char", "min_frequency": args.min_frequency,
                        "chars_seen": len(char_counts)}
        unk_id = tokenizer.unk_token_id
        tok_info["vocab_size"] = len(tokenizer)

        # ---- pass 3: tokenize, window, write
        writer = StoreWriter(out, tokenizer, STORE_SPLITS)
        stats = {(s, sp): _new_stats() for s in sources for sp in STORE_SPLITS}
        n_kept = int(keep.sum())
        token_trunc = 0

        encoder = UtteranceEncoder(tokenizer, writer.dtype, char_level=tok_info["kind"] == "char")

        def flush(batch: list[tuple[int, list[str]]]) -> None:
            nonlocal token_trunc
            flat, offsets = encoder.encode([u for _, turns in batch for u in turns])
            is_unk = np.concatenate([[0], np.cumsum(flat == unk_id)])
            k = 0
            for i, turns in batch:
                nt = len(turns)
                off = offsets[k:k + nt + 1].tolist()
                utt = [flat[off[j]:off[j + 1]] for j in range(nt)]
                lengths = [off[j + 1] - off[j] for j in range(nt)]
                unk = int(is_unk[off[-1]] - is_unk[off[0]])
                k += nt
                if max(lengths) > max_utt_tokens:
                    for j in range(nt):
                        if lengths[j] > max_utt_tokens:
                            utt[j] = utt[j][:max_utt_tokens]
                            lengths[j] = max_utt_tokens
                            token_trunc += 1
                    unk = sum(int((u == unk_id).sum()) for u in utt)
                windows = make_windows(lengths, args.max_turns, args.max_tokens)
                split = STORE_SPLITS[labels[i]]
                writer.add_session(split, utt, windows)
                st = stats[(sources[src[i]], split)]
                st["sessions"] += 1
                st["windows"] += len(windows)
                st["utterances"] += nt
                st["chars"] += sum(map(len, turns))
                st["tokens"] += sum(lengths)
                st["unk_tokens"] += unk
                st["turns_per_session"][nt] += 1
                for _, count in windows:
                    st["turns_per_window"][count] += 1

        with open(tmp_path, encoding="utf-8") as tmp, \
                _progress(args.progress, desc="tokenize+write", unit=" sessions", total=n_kept) as bar:
            batch: list[tuple[int, list[str]]] = []
            for i, line in enumerate(tmp):
                if labels[i] < 0:
                    continue
                batch.append((i, line.rstrip("\n").split("\t")))
                if len(batch) >= args.batch_sessions:
                    flush(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                flush(batch)
                bar.update(len(batch))
        tmp_path.unlink()

        # ---- manifest
        total_counts: Counter = Counter()
        for c in counters.values():
            total_counts.update(c)
        if token_trunc:
            total_counts["utterance_tokens_truncated"] = token_trunc
        by_split = {sp: _new_stats() for sp in STORE_SPLITS}
        for (s, sp), st in stats.items():
            _add_stats(by_split[sp], st)
        manifest = {
            "command": command,
            "config": {**asdict(args), "inputs": [str(p) for p in inputs]},
            "inputs": inputs_info,
            "tokenizer": tok_info,
            "windowing": {"max_turns": args.max_turns, "max_tokens": args.max_tokens,
                          "max_utterance_tokens": max_utt_tokens,
                          "rule": "greedy windows of consecutive turns; the next starts half a window back, "
                                  "so every utterance after the first is a reply in some window"},
            "split": {"method": "source splits kept, the rest sklearn train_test_split" if args.keep_source_splits
                      else "sklearn train_test_split by session, stratified by source when possible",
                      "seed": args.seed, "valid_ratio": args.valid_ratio, "test_ratio": args.test_ratio,
                      **({"held_out_source_splits": holdout, "held_out_names_not_found": holdout_unmatched}
                         if holdout else {})},
            "sessions": {"read": int(total_counts["sessions_read"]), "cleaned": n, "unique": n_kept},
            "counts": {"by_split": {sp: _finish_stats(st) for sp, st in by_split.items()},
                       "by_source": {s: {sp: _finish_stats(stats[(s, sp)]) for sp in STORE_SPLITS}
                                     for s in sources}},
            "unk_rate": {sp: _finish_stats(st)["unk_rate"] for sp, st in by_split.items()},
            "cleaning": {"total": dict(sorted(total_counts.items())),
                         "by_source": {s: dict(sorted(c.items())) for s, c in counters.items()},
                         "drop_reasons": [r for r in DROP_REASONS if total_counts.get(r)]},
            "chars_read": chars_read,
            "encoder": "char table lookup (verified against the tokenizer)" if encoder.table is not None
                       else "tokenizer encode_batch" + (f" ({encoder.fallback_reason})"
                                                         if encoder.fallback_reason else ""),
        }
        full = writer.close(manifest)
    elapsed = time.perf_counter() - t0
    full["_timing"] = {"seconds": elapsed, "read_clean_seconds": t_read}  # not in the file: varies per run
    return full


def summary_table(manifest: dict[str, Any]) -> str:
    """A plain-text table of the counts per source and split, then the cleaning counts."""
    rows = [("source", "split", "sessions", "windows", "utterances", "chars", "tokens", "[UNK]%")]
    for s, per in manifest["counts"]["by_source"].items():
        for sp, st in per.items():
            if st["sessions"]:
                rows.append((s, sp, st["sessions"], st["windows"], st["utterances"], st["chars"], st["tokens"],
                             f"{100 * st['unk_rate']:.3f}"))
    for sp, st in manifest["counts"]["by_split"].items():
        rows.append(("ALL", sp, st["sessions"], st["windows"], st["utterances"], st["chars"], st["tokens"],
                     f"{100 * st['unk_rate']:.3f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("cleaning (count by reason; see corpus/README.md):")
    for reason, count in manifest["cleaning"]["total"].items():
        mark = " (dropped)" if reason in DROP_REASONS else ""
        lines.append(f"  {reason:32s} {count:>10,d}{mark}")
    return "\n".join(lines)


EXAMPLES = """
  python -m dialogpt_zh.preprocess ../shared/corpus/lccc-sample ../shared/corpus/kdconv \\
      ../shared/corpus/chatterbot-zh --output data/base
  python -m dialogpt_zh.preprocess train.txt --output data/chitchat \\
      --vocab ../shared/corpus/vocab/gpt2-chitchat-vocab.txt --max-tokens 300
  python -m dialogpt_zh.preprocess corpus/ --output data/x --format tsv --keep-source-splits \\
      --blocklist words.txt --seed 1
"""


def build_parser():
    parser = make_parser([PreprocessArguments], prog="python -m dialogpt_zh.preprocess",
                         description="Read Chinese dialogue corpora, clean them, and write a token store "
                                     "(see corpus/README.md).", examples=EXAMPLES)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="corpus files or directories (formats may be mixed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        args, rest = parse(parser, argv_list)
        command = "python -m dialogpt_zh.preprocess " + shlex.join(argv_list)
        manifest = run_preprocess(args, rest.inputs, command=command)
        print(summary_table(manifest))
        t = manifest["_timing"]
        print(f"\nwrote {args.output} in {t['seconds']:.1f}s "
              f"({manifest['chars_read'] / max(t['seconds'], 1e-9):,.0f} chars/s)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
