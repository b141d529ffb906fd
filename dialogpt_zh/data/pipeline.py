"""Preprocessor: corpus files -> clean sessions -> dedupe -> split -> tokenizer -> windows -> token store.

    python -m dialogpt_zh.preprocess ../shared/corpus/lccc-sample ../shared/corpus/kdconv --output data/base

Passes (memory stays flat: sessions go to a temp file inside the output's temp directory):
1. read + clean every input (dialogpt_zh.data.readers / dialogpt_zh.data.cleaning), write each session as one line
   of the temp file and keep only an 8-byte hash, a source id and a split code per session;
2. drop exact duplicate sessions (same cleaned turns, anywhere in the inputs; the first is kept), then
   split by session (scikit-learn `train_test_split`, `--seed`, stratified by source when possible),
   or keep a source's own split (`--keep-source-splits`);
3. build a char tokenizer from the train split's characters (or load `--vocab`);
4. tokenize (the fast tokenizer's `encode_batch`), cut each session into windows, write the store
   (dialogpt_zh.data.store.StoreWriter) inside `fsutil.atomic_directory`, so a failed run leaves no half store.

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
import json
import logging
import re
import shlex
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dialogpt_zh.cli import field_help, hold_stops, raise_if_stopped
from dialogpt_zh.data.cleaning import CleaningOptions, load_blocklist
from dialogpt_zh.data.pool import (
    clean_pool,
    effective_workers,
    ordered_map,
    read_units,
)
from dialogpt_zh.data.readers import FORMATS, InputScan, scan_inputs
from dialogpt_zh.data.windows import (
    STORE_SPLITS,
    CleanedCorpus,
    SplitPlan,
    WindowWriter,
    _add_stats,
    _finish_stats,
    _new_stats,
    _total,
)
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_directory, check_output_name, file_sha256
from dialogpt_zh.settings import check_seed
from dialogpt_zh.tokenizer import UtteranceEncoder

log = logging.getLogger("dialogpt_zh.preprocess")

SOURCE_SPLIT_CODES = {"train": 0, "valid": 1, "validation": 1, "val": 1, "dev": 1, "test": 2}
# --seed goes to scikit-learn's train_test_split, whose random_state takes no more
SPLIT_SEED_MAX = 2**32 - 1
# --workers: each is a process of its own; far more than the cores only hangs the machine
MAX_WORKERS = 256


# counters that mean something was dropped (the others count changes)
DROP_REASONS = ("utterance_empty_dropped", "utterance_not_text", "session_too_short", "turns_in_short_sessions",
                "session_blocklisted", "turns_in_blocklisted_sessions", "session_duplicate", "record_malformed",
                "line_malformed", "files_skipped", "url_removed", "session_held_out",
                "session_same_as_held_out", "message_system_skipped", "message_tool_skipped", "record_no_turns",
                "session_subsampled_out")


@dataclass
class PreprocessArguments:
    output: str = field(metadata=field_help(
        "output store directory; written beside it and put in place only when complete. It must not exist (or be "
        "empty), be nor hold nor lie inside an input"))
    overwrite: bool = field(default=False, metadata=field_help(
        "replace an existing OUTPUT that is a token store (anything else there is never replaced)"))
    format: str = field(default="auto", metadata=field_help(
        f"input format: auto (by extension and content) or one of {', '.join(FORMATS)}; any file may be "
        "gzip'd (.gz) or in a .zip (each member read as its own file)"))
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
        "reuse this BERT-style vocab.txt (e.g. ../shared/corpus/vocab/gpt2-chitchat-vocab.txt), tokenizer "
        "directory or model directory (GPT2-chitchat, CDial-GPT2, uer/gpt2-chinese: its vocab.txt; then "
        "`train --init MODEL_DIR` continues that model) instead of building a char vocabulary; the summary "
        "reports the [UNK] rate"))
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
    upsample: str = field(default="", metadata=field_help(
        "comma list of SOURCE=N (SOURCE: an input's name as in the summary table, e.g. 'kdconv=4'): that "
        "source's train windows are written N times, so training sees it N times as often; valid/test are "
        "never repeated. The counts per source stay those of the unique sessions; the repeats are counted "
        "under 'upsampled'"))
    subsample: str = field(default="", metadata=field_help(
        "comma list of SOURCE=N: keep a seeded random N of that source's sessions (N a whole number), or "
        "that share of them (0 < N < 1, e.g. 'smile=0.1'), chosen after the dedupe and before the "
        "split, so its valid/test shrink alike; the rest are counted as session_subsampled_out. For a "
        "large pre-training text trained on a time budget"))
    batch_sessions: int = field(default=2000, metadata=field_help("sessions tokenized per batch"))
    workers: int = field(default=0, metadata=field_help(
        "processes that clean the text (the output is the same for any number); 0 = auto: 2 for inputs of "
        "4 MB or more when two CPUs are idle (load average), else 1"))
    progress: bool = field(default=True, metadata=field_help("show tqdm progress bars"))

    def __post_init__(self) -> None:
        """Refuse a bad setting when the arguments are made (flags, --config or Python), naming it."""
        if self.format != "auto" and self.format not in FORMATS:
            raise UserError(f"unknown format {self.format!r}; choose auto or one of {', '.join(FORMATS)}",
                            field="format")
        if self.max_turns < 2:
            raise UserError("must be at least 2 (a context and a reply)", field="max_turns")
        if self.max_tokens < 5:
            raise UserError("must be at least 5", field="max_tokens")
        for name in ("valid_ratio", "test_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError("must be in [0, 1)", field=name)
        if self.valid_ratio + self.test_ratio >= 1.0:
            raise UserError("valid_ratio + test_ratio must be below 1", field="valid_ratio")
        if self.min_frequency < 1:
            raise UserError("must be at least 1", field="min_frequency")
        if self.batch_sessions < 1:
            raise UserError("must be at least 1", field="batch_sessions")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise UserError(f"must be 0 (auto) or in [1, {MAX_WORKERS}], got {self.workers}", field="workers")
        check_seed(self.seed, "seed", maximum=SPLIT_SEED_MAX)
        parse_upsample(self.upsample)
        parse_subsample(self.subsample)


def parse_source_values(text: str, field_name: str, sources: Sequence[str] | None = None,
                        fraction: bool = False) -> dict[str, float]:
    """'kdconv=4,lccc-base=2' -> {'kdconv': 4, 'lccc-base': 2}: whole numbers >= 1 (with `fraction`, also
    shares 0 < x < 1); with `sources`, every name must be one of them."""
    what = "a whole number >= 1" + (" or a share between 0 and 1" if fraction else "")
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, eq, value = (x.strip() for x in item.rpartition("="))
        number = None
        if eq and name:
            if value.isdigit() and int(value) >= 1:
                number = int(value)
            elif fraction and re.fullmatch(r"0?\.\d+", value) and 0 < float(value) < 1:
                number = float(value)
        if number is None:
            raise UserError(f"{item!r} is not SOURCE=N with N {what}", field=field_name)
        if name in out:
            raise UserError(f"source {name!r} given twice", field=field_name)
        out[name] = number
    if sources is not None:
        unknown = sorted(set(out) - set(sources))
        if unknown:
            raise UserError(f"no input is named {', '.join(map(repr, unknown))} (inputs: {', '.join(sources)})",
                            field=field_name)
    return out


def parse_upsample(text: str, sources: Sequence[str] | None = None) -> dict[str, int]:
    """'kdconv=4,lccc-base=2' -> {'kdconv': 4, 'lccc-base': 2}; with `sources`, every name must be one."""
    return {k: int(v) for k, v in parse_source_values(text, "upsample", sources).items()}


def parse_subsample(text: str, sources: Sequence[str] | None = None) -> dict[str, float]:
    """'smile=5000' (sessions) or 'smile=0.1' (a share)."""
    return parse_source_values(text, "subsample", sources, fraction=True)


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




def load_tokenizer_for(args: PreprocessArguments):
    from dialogpt_zh.tokenizer import load_tokenizer, load_vocab_tokenizer

    path = Path(args.vocab)
    if path.is_dir():
        return load_tokenizer(path)
    return load_vocab_tokenizer(path)


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


def is_token_store(path: Path) -> bool:
    """A directory our preprocessor wrote (its manifest names our format): what --overwrite may replace."""
    from dialogpt_zh.data.store import MANIFEST, STORE_FORMAT

    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == STORE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(args: PreprocessArguments, inputs: Sequence[str | Path]) -> Path:
    """The output directory, resolved, after refusing what it may not replace (before any work is done):
    an input (or a directory holding one, or one inside an input), the current directory, a file, and an
    existing directory unless `--overwrite` is given and it is a token store."""
    check_output_name(args.output, "output")
    out = Path(args.output).resolve()
    named = [("input", p) for p in inputs] + [(f"--{k}", getattr(args, k)) for k in ("vocab", "blocklist")
                                               if getattr(args, k)]
    for what, p in named:
        p = Path(p).resolve()
        if out == p or out in p.parents or p in out.parents:
            rel = "is" if out == p else "contains" if out in p.parents else "is inside"
            raise UserError(f"the output {rel} the {what} {p}; the preprocessor never writes over or into "
                            f"its inputs: choose another --output", path=args.output, field="output")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError("the output is (or contains) the current directory; choose another --output",
                        path=args.output, field="output")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError("exists and is not a directory; choose another --output", path=args.output)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError("output directory exists; pass --overwrite to replace it", path=args.output)
        if not is_token_store(out):
            raise UserError("exists and is not a token store (no manifest.json of one); refusing to replace it "
                            "even with --overwrite: choose another --output", path=args.output)
    return out


def read_and_clean(args: PreprocessArguments, scans: list[InputScan], options: CleaningOptions,
                   tmp_path: Path) -> CleanedCorpus:
    """Pass 1: read every input and clean it (in `--workers` processes, results kept in input order)."""
    sources = [s.source for s in scans]
    counters = {s: Counter() for s in sources}
    hashes, src_ids, src_splits = array("q"), array("H"), array("h")
    split_names: dict[str, int] = {}
    files = [(si, cf) for si, scan in enumerate(scans) for cf in scan.files]
    sessions_read: dict[int, int] = {}  # file index -> raw sessions read
    kept_per_file: Counter = Counter()
    chars = 0
    workers = effective_workers(args.workers, files)
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as tmp, \
            _progress(args.progress, desc="read+clean", unit=" sessions") as bar, \
            clean_pool(workers, options) as pool:
        units = read_units(files, counters, sources, sessions_read)
        for fi, splits, (text, hash_bytes, pieces, n_chars, c_counts) in ordered_map(pool, units, workers):
            raise_if_stopped()
            si = files[fi][0]
            counters[sources[si]].update(c_counts)
            tmp.write(text)
            hashes.frombytes(hash_bytes)
            k = len(hash_bytes) // 8
            src_ids.extend(array("H", [si]) * k)
            if len(set(splits)) == 1:
                sp = splits[0]
                code = split_names.setdefault(sp, len(split_names)) if sp and k else -1
                src_splits.extend(array("h", [code]) * k)
            else:
                for sp, count in zip(splits, pieces):
                    if count:
                        code = split_names.setdefault(sp, len(split_names)) if sp else -1
                        src_splits.extend(array("h", [code]) * count)
            chars += n_chars
            kept_per_file[fi] += k
            bar.update(k)
    inputs_info = []
    for si, scan in enumerate(scans):
        counters[scan.source]["files_skipped"] += len(scan.skipped)
        inputs_info.append({"path": str(scan.path), "source": scan.source, "files": [],
                            "skipped_files": scan.skipped})
    file_hashes: dict[Path, str] = {}  # size and sha256 are of the file on disk (a zip member: its archive)
    for fi, (si, cf) in enumerate(files):
        if cf.path not in file_hashes:
            file_hashes[cf.path] = file_sha256(cf.path)
        inputs_info[si]["files"].append({"path": cf.name, "format": cf.format, "split": cf.split,
                                         "size": cf.path.stat().st_size, "sha256": file_hashes[cf.path],
                                         "sessions_read": sessions_read[fi],
                                         "sessions_cleaned": kept_per_file[fi]})
    corpus = CleanedCorpus(tmp_path, sources, np.frombuffer(hashes, dtype=np.int64),
                           np.frombuffer(src_ids, dtype=np.uint16), np.frombuffer(src_splits, dtype=np.int16),
                           split_names, counters, inputs_info, chars)
    if not len(corpus):
        total = _total(counters)
        dropped = ", ".join(f"{r} {total[r]:,d}" for r in DROP_REASONS if total.get(r)) or "none"
        raise UserError(f"no sessions left after cleaning (sessions read: {total['sessions_read']:,d}; dropped: "
                        f"{dropped}); nothing to write", path=scans[0].path)
    return corpus


def dedupe_and_split(args: PreprocessArguments, corpus: CleanedCorpus,
                     subsample: dict[str, float] | None = None) -> SplitPlan:
    """Pass 2: drop exact duplicates (the first is kept) and held-out sessions, keep the `subsample` pick
    (`parse_subsample`), then assign splits."""
    h = corpus.hashes
    _, first = np.unique(h, return_index=True)
    keep = np.zeros(len(corpus), dtype=bool)
    keep[first] = True
    corpus.count_per_source(~keep, "session_duplicate")
    holdout = sorted({x.strip() for x in args.holdout_source_splits.split(",") if x.strip()})
    not_found = [name for name in holdout if name not in corpus.split_names]
    if not_found:
        log.warning("--holdout-source-splits: no input has a source split named %s (seen: %s); "
                    "names must match exactly (dev is not valid)", ", ".join(not_found),
                    ", ".join(sorted(corpus.split_names)) or "none")
    if holdout:
        in_holdout = np.isin(corpus.own_split, [i for name, i in corpus.split_names.items() if name in holdout])
        held = keep & in_holdout
        # a session equal to a held-out one (a duplicate in another file) is left out too, whichever
        # came first, so that no held-out session is ever trained on
        same = keep & ~in_holdout & np.isin(h, h[in_holdout])
        corpus.count_per_source(held, "session_held_out")
        corpus.count_per_source(same, "session_same_as_held_out")
        keep &= ~(held | same)
        if not keep.any():
            raise UserError("every session is in a held-out source split; nothing left to train on",
                            field="holdout_source_splits")
    subsampled = subsample_sessions(keep, corpus, subsample or {}, args.seed)
    labels = np.full(len(corpus), -1, dtype=np.int8)
    if args.keep_source_splits:
        code_of = np.full(len(corpus.split_names) + 1, -1, dtype=np.int8)  # the last entry: no split (-1)
        for name, i in corpus.split_names.items():
            code_of[i] = SOURCE_SPLIT_CODES.get(name, -1)
        own = code_of[corpus.own_split]
        labels[keep & (own >= 0)] = own[keep & (own >= 0)]
    free = np.flatnonzero(keep & (labels < 0))
    if len(free):
        labels[free] = split_indices(len(free), args.valid_ratio, args.test_ratio, args.seed, corpus.source[free])
    labels[~keep] = -1
    return SplitPlan(labels, holdout, not_found, subsampled)


def subsample_sessions(keep: np.ndarray, corpus: CleanedCorpus, wanted: dict[str, float], seed: int
                       ) -> dict[str, dict[str, Any]]:
    """Clear `keep` for all but a seeded random N (or share) of each named source's kept sessions."""
    out: dict[str, dict[str, Any]] = {}
    for name, n in wanted.items():
        si = corpus.sources.index(name)
        idx = np.flatnonzero(keep & (corpus.source == si))
        target = min(len(idx), int(n) if n >= 1 else max(1, round(n * len(idx))))  # a share keeps at least one
        # one generator per source, seeded by the source's name too, so adding a source changes no other's pick
        rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
        dropped = np.zeros(len(corpus), dtype=bool)
        dropped[idx] = True
        dropped[rng.choice(idx, size=target, replace=False)] = False
        corpus.count_per_source(dropped, "session_subsampled_out")
        keep &= ~dropped
        out[name] = {"requested": n, "kept": int(target), "of": int(len(idx))}
    if wanted and not keep.any():
        raise UserError("no session left after the subsample", field="subsample")
    return out


def make_tokenizer(args: PreprocessArguments, corpus: CleanedCorpus, plan: SplitPlan, given_tokenizer=None
                   ) -> tuple[Any, dict[str, Any]]:
    """Pass 3: the `--vocab` tokenizer, or a char tokenizer built from the train split's characters."""
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    if given_tokenizer is not None:
        info = {"kind": "vocab", "vocab": str(args.vocab)}
        # a vocab.txt, or the one of a model directory (GPT2-chitchat, CDial-GPT2, uer: `--vocab MODEL_DIR`)
        vocab_file = Path(args.vocab) if Path(args.vocab).is_file() else Path(args.vocab) / "vocab.txt"
        if vocab_file.is_file():
            info["vocab_sha256"] = file_sha256(vocab_file)
        info["vocab_size"] = len(given_tokenizer)
        return given_tokenizer, info
    char_counts: Counter = Counter()
    chunk: list[str] = []
    with open(corpus.path, encoding="utf-8") as tmp:
        for i, line in enumerate(tmp):
            if plan.labels[i] == 0:
                chunk.append(line)
                if len(chunk) >= 5000:
                    count_chars(["".join(chunk)], char_counts)
                    chunk = []
    count_chars(["".join(chunk)], char_counts)
    if not char_counts:
        raise UserError("the train split is empty; lower --valid_ratio/--test_ratio or add data", field="valid_ratio")
    tokenizer = build_char_tokenizer(char_counts, args.min_frequency)
    return tokenizer, {"kind": "char", "min_frequency": args.min_frequency, "chars_seen": len(char_counts),
                       "vocab_size": len(tokenizer)}


def make_manifest(args: PreprocessArguments, inputs: Sequence[str | Path], scans: list[InputScan], command: str,
                  corpus: CleanedCorpus, plan: SplitPlan, tok_info: dict[str, Any], ww: WindowWriter
                  ) -> dict[str, Any]:
    """What the store records about how it was made (StoreWriter.close adds the format fields)."""
    total_counts = _total(corpus.counters)
    if ww.tokens_truncated:
        total_counts["utterance_tokens_truncated"] = ww.tokens_truncated
    by_split = {sp: _new_stats() for sp in STORE_SPLITS}
    for (s, sp), st in ww.stats.items():
        _add_stats(by_split[sp], st)
    encoder = ww.encoder
    return {
        "command": command,
        "config": {**asdict(args), "inputs": [str(p) for p in inputs]},
        "inputs": corpus.inputs_info,
        "corpora": [{"source": scan.source, "path": str(scan.path), "licence": scan.licence,
                     "licence_file": scan.licence_file} for scan in scans],
        "tokenizer": tok_info,
        "windowing": {"max_turns": args.max_turns, "max_tokens": args.max_tokens,
                      "max_utterance_tokens": ww.max_utterance_tokens,
                      "rule": "greedy windows of consecutive turns; the next starts half a window back, "
                              "so every utterance after the first is a reply in some window"},
        "split": {"method": "source splits kept, the rest sklearn train_test_split" if args.keep_source_splits
                  else "sklearn train_test_split by session, stratified by source when possible",
                  "seed": args.seed, "valid_ratio": args.valid_ratio, "test_ratio": args.test_ratio,
                  **({"held_out_source_splits": plan.holdout, "held_out_names_not_found": plan.holdout_not_found}
                     if plan.holdout else {})},
        "sessions": {"read": int(total_counts["sessions_read"]), "cleaned": len(corpus), "unique": plan.kept},
        "counts": {"by_split": {sp: _finish_stats(st) for sp, st in by_split.items()},
                   "by_source": {s: {sp: _finish_stats(ww.stats[(s, sp)]) for sp in STORE_SPLITS}
                                 for s in corpus.sources}},
        "unk_rate": {sp: _finish_stats(st)["unk_rate"] for sp, st in by_split.items()},
        **({"upsampled": ww.upsampled} if ww.upsampled else {}),
        **({"subsampled": plan.subsampled} if plan.subsampled else {}),
        "cleaning": {"total": dict(sorted(total_counts.items())),
                     "by_source": {s: dict(sorted(c.items())) for s, c in corpus.counters.items()},
                     "drop_reasons": [r for r in DROP_REASONS if total_counts.get(r)]},
        "chars_read": corpus.chars,
        "encoder": "char table lookup (verified against the tokenizer)" if encoder.table is not None
                   else "tokenizer encode_batch" + (f" ({encoder.fallback_reason})"
                                                     if encoder.fallback_reason else ""),
    }


def run_preprocess(args: PreprocessArguments, inputs: Sequence[str | Path],
                   command: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest written to `args.output`/manifest.json.

    Everything that can be checked is checked before the work starts (arguments, inputs, the output path,
    the blocklist and vocab files); the store is written into a temp directory beside the output and put in
    place only when complete (`fsutil.atomic_directory`).
    """
    from dialogpt_zh.data.store import StoreWriter

    if not inputs:
        raise UserError("no inputs given", field="inputs")
    t0 = time.perf_counter()
    output = check_output(args, inputs)
    blocklist = load_blocklist(args.blocklist) if args.blocklist else ()
    options = CleaningOptions(max_utterance_chars=args.max_utterance_chars, max_repeat=args.max_repeat,
                              min_turns=args.min_turns, mask_pii=args.mask_pii, blocklist=blocklist)
    scans: list[InputScan] = scan_inputs(inputs, args.format)
    for note in (n for scan in scans for n in scan.notes):
        log.info("%s", note)
    sources = [scan.source for scan in scans]  # a wrong name in --upsample/--subsample fails before the work
    upsample, subsample = parse_upsample(args.upsample, sources), parse_subsample(args.subsample, sources)
    given_tokenizer = load_tokenizer_for(args) if args.vocab else None
    if command is None:
        command = "python -m dialogpt_zh.preprocess " + shlex.join(args_to_argv(args, inputs))

    with atomic_directory(output, replace_existing=True) as out:  # check_output decided what may be replaced
        corpus = read_and_clean(args, scans, options, out / "sessions.tmp")
        t_read = time.perf_counter() - t0
        plan = dedupe_and_split(args, corpus, subsample)
        corpus.hashes = corpus.own_split = None  # not needed after pass 2 (10 bytes a session)
        tokenizer, tok_info = make_tokenizer(args, corpus, plan, given_tokenizer)
        writer = StoreWriter(out, tokenizer, STORE_SPLITS, sources=corpus.sources)
        encoder = UtteranceEncoder(tokenizer, writer.dtype, char_level=tok_info["kind"] == "char")
        ww = write_windows(args, corpus, plan, writer, encoder, upsample)
        corpus.path.unlink()
        raise_if_stopped()  # a stop that arrived while a worker pool forked must not let the store commit
        full = writer.close(make_manifest(args, inputs, scans, command, corpus, plan, tok_info, ww))
        raise_if_stopped()  # the last moment a stop cancels the run: ...
        hold_stops()  # ... from here the complete store is put in place and the run finishes (moments)
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
    for s, up in manifest.get("upsampled", {}).items():
        lines.append(f"upsampled: {s}'s train windows written {up['copies']} times "
                     f"(+{up['windows']:,d} windows, +{up['tokens']:,d} tokens in train)")
    for s, sub in manifest.get("subsampled", {}).items():
        lines.append(f"subsampled: {s} kept {sub['kept']:,d} of its {sub['of']:,d} unique sessions "
                     f"(asked for {sub['requested']})")
    lines.append("")
    lines.append("cleaning (count by reason; see corpus/README.md):")
    for reason, count in manifest["cleaning"]["total"].items():
        mark = " (dropped)" if reason in DROP_REASONS else ""
        lines.append(f"  {reason:32s} {count:>10,d}{mark}")
    return "\n".join(lines)


def write_windows(args: PreprocessArguments, corpus: CleanedCorpus, plan: SplitPlan, writer,
                  encoder: UtteranceEncoder, upsample: dict[str, int] | None = None) -> WindowWriter:
    """Pass 4: stream the kept sessions from the temp file through a WindowWriter in batches."""
    ww = WindowWriter(writer, encoder, corpus, plan, args.max_turns, args.max_tokens, upsample)
    with open(corpus.path, encoding="utf-8") as tmp, \
            _progress(args.progress, desc="tokenize+write", unit=" sessions", total=plan.kept) as bar:
        batch: list[tuple[int, list[str]]] = []
        for i, line in enumerate(tmp):
            if plan.labels[i] < 0:
                continue
            batch.append((i, line.rstrip("\n").split("\t")))
            if len(batch) >= args.batch_sessions:
                ww.add(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            ww.add(batch)
            bar.update(len(batch))
    return ww


