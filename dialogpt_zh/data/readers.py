"""Corpus readers: paths -> a stream of raw sessions (turns + source, file, line, the source's own split).

Formats (`--format`; `auto` picks by extension, then by content):

- `chitchat` (`.txt`): GPT2-chitchat train.txt: one utterance per line, blank line between sessions (LF/CRLF)
- `tsv` (`.tsv`, `.txt`): one session per line, turns separated by TAB (LCCC toy_train.txt)
- `lccc-json` (`.json`): a list of sessions (lists of utterances), or a dict of splits of such lists
- `kdconv-json` (`.json`): a list (or dict of splits) of `{"messages": [{"message": ...}, ...]}`; `attrs` ignored
- `chat-json` (`.json`): a list (or dict of splits) of chat records: `{"messages": [{"role", "content"}]}`
  (OpenAI) or `{"conversations": [{"from", "value"}]}` (ShareGPT)
- `chat-jsonl` (`.jsonl`, `.ndjson`): one chat record per line (JSON Lines)
- `chatterbot-yaml` (`.yml`, `.yaml`): `conversations: [[utterance, ...], ...]`
- `conv` (`.conv`): subtitle dialogues: `E` starts a session, `M text` is an utterance

A `.txt` file is `tsv` when most of its first lines contain a TAB, `conv` when it starts with an `E` line,
else `chitchat`; a `.json` file is `chat-jsonl` when its first line is a whole chat record, `chat-json` when
its first session is a chat record, `kdconv-json` when it is another object, else `lccc-json`. The chat
record rules (system messages, roles, non-text content) are in `chat_turns`.

Compressed input: any of these gzip'd (`train.txt.gz`, `x.jsonl.gz`: detected by the name without `.gz`
and the decompressed content), and `.zip` archives, each supported member read as its own file named
`archive.zip:member.txt` (other members are skipped and reported); streamed, never unpacked to disk. A
corrupt or truncated archive is a `UserError` naming the file.

Directories are walked recursively in sorted order; files of other types (LICENSE, README.md, ...) are
skipped and reported. Everything streams: line formats line by line, JSON one session at a time (a small
incremental parser over `json.JSONDecoder.raw_decode`), so memory does not grow with the file. YAML files
are loaded whole (ChatterBot files are a few KB). `corpus_licence` names the licence of an input (the
preprocessor writes it to the manifest's `corpora`).

Bad input raises `UserError` with file and line: a missing path, a directory without corpus files, a file
reached through two inputs (given twice, or a directory and a file in it: read twice, it counted twice), an
unknown format, bytes that are not UTF-8, malformed JSON (a JSON Lines line included) or YAML, a corrupt
archive. Malformed *records* inside a well-formed file (a session that is not a list of strings, a chat
record without a messages list, a `.conv` line that is neither `E` nor `M ...`) are skipped and counted
(`record_malformed`, `line_malformed`).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

# The readers' pieces live in corpus_files (files, bytes, lines, licences) and chat_readers (JSON, JSON
# Lines, YAML); this module is the public entry and re-exports what callers use.
from dialogpt_zh.data.chat_readers import (  # noqa: F401
    CHAT_SPEAKER_ROLES,
    CHAT_SYSTEM_ROLES,
    CHAT_TOOL_ROLES,
    _is_chat_record,
    _iter_json_sessions,
    _JsonStream,
    chat_turns,
    read_chat_json,
    read_chat_jsonl,
    read_chatterbot_yaml,
    read_kdconv_json,
    read_lccc_json,
)
from dialogpt_zh.data.corpus_files import (  # noqa: F401
    LICENCE_FILE_NAMES,
    SPLIT_NAMES,
    CorpusFile,
    InputScan,
    RawSession,
    _iter_line_blocks,
    _iter_lines,
    _strip_gz,
    _zip_members,
    corpus_licence,
    open_corpus_file,
    recognise_licence,
    split_from_name,
    wide_encoding,
)
from dialogpt_zh.errors import UserError

FORMATS = ("chitchat", "tsv", "lccc-json", "kdconv-json", "chat-json", "chat-jsonl", "chatterbot-yaml", "conv")
CORPUS_EXTENSIONS = {".txt": None, ".tsv": "tsv", ".json": None, ".jsonl": "chat-jsonl", ".ndjson": "chat-jsonl",
                     ".yml": "chatterbot-yaml", ".yaml": "chatterbot-yaml", ".conv": "conv"}


def _head(cf: CorpusFile, size: int = 65536) -> str:
    with open_corpus_file(cf) as f:
        data = f.read(size)
    wide = wide_encoding(data)
    if wide:
        raise UserError(f"{wide} text, not UTF-8; convert it first, e.g. `iconv -f {wide} -t UTF-8`", path=cf.name)
    if b"\x00" in data:
        return "\x00"
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


def _first_json_record(cf: CorpusFile) -> object:
    """The first session of a JSON file (None when it cannot be decoded: reading it will say why)."""
    try:
        with closing(_iter_json_sessions(cf)) as it:
            return next(it, (None,))[0]
    except (UserError, RecursionError):
        return None


def sniff_format(path: Path | CorpusFile, explicit_only: bool = False) -> str | None:
    """Guess a file's format from its (decompressed) name and first bytes; None when it cannot tell."""
    cf = path if isinstance(path, CorpusFile) else CorpusFile(Path(path), "", "", None)
    ext = Path(cf.inner_name).suffix.lower()
    if ext in CORPUS_EXTENSIONS and CORPUS_EXTENSIONS[ext] is not None:
        return CORPUS_EXTENSIONS[ext]
    if ext not in CORPUS_EXTENSIONS and not explicit_only:
        return None
    head = _head(cf)
    if "\x00" in head:
        return None
    stripped = head.lstrip()
    if stripped[:1] == "{" and ext in (".json", ".txt", ""):
        # JSON Lines named .json (or not named): the first line is a whole chat record
        try:
            if _is_chat_record(json.loads(stripped.split("\n", 1)[0])):
                return "chat-jsonl"
        except (ValueError, RecursionError):
            pass
    if ext == ".json" or (ext not in CORPUS_EXTENSIONS and stripped[:1] in ("[", "{")):
        if stripped[:1] == "{":
            # a dict of splits: look at the first value's first element
            m = re.search(r":\s*\[\s*(\S)", stripped)
            first = m.group(1) if m else "["
        else:
            first = stripped[1:].lstrip()[:1]
        if ext == ".json" or first in ("[", "{", "]"):
            if first != "{":
                return "lccc-json"
            return "chat-json" if _is_chat_record(_first_json_record(cf)) else "kdconv-json"
    lines = [ln.rstrip("\r") for ln in head.split("\n")[:200]]
    nonblank = [ln for ln in lines if ln.strip()]
    if not nonblank:
        return "chitchat" if ext == ".txt" else None
    if re.match(r"^conversations\s*:", head, re.MULTILINE):
        return "chatterbot-yaml"
    if nonblank[0].strip() == "E" and all(ln.strip() == "E" or ln.startswith("M") for ln in nonblank[:50]):
        return "conv"
    with_tab = sum(1 for ln in nonblank if "\t" in ln)
    if with_tab * 2 >= len(nonblank):
        return "tsv"
    return "chitchat" if ext == ".txt" else None


def _is_corpus_name(name: str) -> bool:
    """A corpus file by its name (after a `.gz`), a hidden file is not."""
    return not Path(name).name.startswith(".") and Path(_strip_gz(name)).suffix.lower() in CORPUS_EXTENSIONS


def _add_file(scan: InputScan, cf: CorpusFile, fmt: str, explicit: bool) -> None:
    """Detect `cf`'s format (unless forced) and add it to the scan's files, or to its skipped ones."""
    detected = fmt if fmt != "auto" else sniff_format(cf, explicit_only=explicit)
    if detected is None:
        if explicit:
            tar = any(x in cf.name.lower() for x in (".tar", ".tgz"))
            hint = " (tar archives are not read: use .zip, or .gz per file)" if tar else ""
            raise UserError(f"cannot tell the corpus format; pass --format (one of {', '.join(FORMATS)}){hint}",
                            path=cf.name)
        scan.skipped.append(cf.name)
        return
    cf.format = detected
    scan.files.append(cf)


def _add_zip(scan: InputScan, path: Path, fmt: str, explicit: bool) -> None:
    """Every supported member of a zip archive, each as its own corpus file (`archive.zip:member`)."""
    archive_split = split_from_name(path)
    for member in _zip_members(path):
        cf = CorpusFile(path, "", scan.source, split_from_name(member) or archive_split, member)
        if not _is_corpus_name(member):
            scan.skipped.append(cf.name)
            continue
        _add_file(scan, cf, fmt, explicit=False)
    if explicit and not scan.files:
        what = f" (skipped: {', '.join(Path(s).name for s in scan.skipped[:5])})" if scan.skipped else ""
        raise UserError(f"archive holds no corpus files{what}", path=path)


# Files our own commands write beside a corpus, by name: a directory scan skips them (with a note), while the
# same file given by its own path is still read. `feedback export DIR` writes DIR/train.txt + DIR/stats.json,
# and `preprocess DIR` must read the first only.
NOT_CORPUS_FILES = {"stats.json": "the statistics `python -m dialogpt_zh.feedback export` writes beside its train.txt"}


def scan_input(path: str | Path, fmt: str = "auto", source: str | None = None) -> InputScan:
    """Resolve one input (file, `.gz`, `.zip` or directory) into corpus files with their formats."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}", field="format")
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or directory", path=path)
    scan = InputScan(path=path, source=source or (path.resolve().name if path.is_dir() else path.name))
    scan.licence, scan.licence_file = corpus_licence(path)
    if path.is_file():
        if path.suffix.lower() == ".zip":
            _add_zip(scan, path, fmt, explicit=True)
        else:
            _add_file(scan, CorpusFile(path, "", scan.source, split_from_name(path)), fmt, explicit=True)
        return scan
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if not name.startswith(".") and name.lower().endswith(".zip"):
                _add_zip(scan, p, fmt, explicit=False)
            elif name in NOT_CORPUS_FILES:
                scan.skipped.append(str(p))
                scan.notes.append(f"skipped {p}: {NOT_CORPUS_FILES[name]}, not a corpus "
                                  f"(give the file itself as an input to read it as one)")
            elif not _is_corpus_name(name):
                scan.skipped.append(str(p))
            else:
                _add_file(scan, CorpusFile(p, "", scan.source, split_from_name(p)), fmt, explicit=False)
    if not scan.files:
        what = f" (skipped: {', '.join(Path(s).name for s in scan.skipped[:5])})" if scan.skipped else ""
        raise UserError("directory holds no corpus files (.txt .tsv .json .jsonl .yml .yaml .conv, also as .gz, "
                        f"or in .zip){what}", path=path)
    return scan


def read_chitchat(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    turns: list[str] = []
    start = 0
    for lineno, text in _iter_lines(cf):
        if text.strip():
            if not turns:
                start = lineno
            turns.append(text)
        elif turns:
            yield RawSession(turns, start)
            turns = []
    if turns:
        yield RawSession(turns, start)


def read_tsv(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    for first, lines in _iter_line_blocks(cf):
        for i, text in enumerate(lines):
            if text and not text.isspace():
                yield RawSession(text.split("\t"), first + i)


def read_conv(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    turns: list[str] = []
    start = 0
    for first, lines in _iter_line_blocks(cf):
        for i, text in enumerate(lines):
            if text[:2] == "M " or text == "M" or text[:2] == "M\t":
                if not turns:
                    start = first + i
                turns.append(text[2:])
            elif text == "E" or text.strip() == "E":
                if turns:
                    yield RawSession(turns, start)
                turns = []
            elif text.strip():
                counters["line_malformed"] += 1
    if turns:
        yield RawSession(turns, start)


READERS = {"chitchat": read_chitchat, "tsv": read_tsv, "lccc-json": read_lccc_json,
           "kdconv-json": read_kdconv_json, "chat-json": read_chat_json, "chat-jsonl": read_chat_jsonl,
           "chatterbot-yaml": read_chatterbot_yaml, "conv": read_conv}


def read_file(corpus_file: CorpusFile, counters: Counter | None = None) -> Iterator[RawSession]:
    """Raw sessions of one corpus file; the split is the record's (JSON dict key) or the file name's."""
    counters = counters if counters is not None else Counter()
    for raw in READERS[corpus_file.format](corpus_file, counters):
        if raw.split is None:
            raw.split = corpus_file.split
        counters["sessions_read"] += 1
        yield raw


def scan_inputs(paths: Iterable[str | Path], fmt: str = "auto") -> list[InputScan]:
    """Scan several inputs; sources with the same name get a `#2`, `#3` suffix."""
    scans: list[InputScan] = []
    seen: Counter = Counter()
    taken: dict[tuple[str, str | None], str | Path] = {}  # (real path, zip member) -> the input that gave it
    for p in paths:
        scan = scan_input(p, fmt)
        for f in scan.files:  # a file read twice counts every session twice (evaluate's cases, the arena's draw)
            where = (os.path.realpath(f.path), f.member)
            if where in taken:
                raise UserError(f"would read {f.name} a second time (it is read through the input {taken[where]} "
                                "already); give each file once", path=p)
            taken[where] = p
        seen[scan.source] += 1
        if seen[scan.source] > 1:
            scan.source = f"{scan.source}#{seen[scan.source]}"
            for f in scan.files:
                f.source = scan.source
        scans.append(scan)
    return scans


@dataclass(slots=True)
class CleanSession:
    """A cleaned session: at least `min_turns` non-empty normalised utterances."""

    turns: list[str]
    source: str
    path: str
    line: int
    split: str | None = None


def iter_clean_sessions(paths: str | Path | Sequence[str | Path], fmt: str = "auto", options=None,
                        counters: Counter | None = None) -> Iterator[CleanSession]:
    """Read and clean sessions from files/directories, exactly as the preprocessor does (no dedupe).

    `counters` (a Counter) receives every reader and cleaning count by reason. A raw session split at
    empty utterances yields several CleanSessions with the same path and line.
    """
    from dialogpt_zh.data.cleaning import CleaningOptions

    if isinstance(paths, (str, Path)):
        paths = [paths]
    options = options or CleaningOptions()
    counters = counters if counters is not None else Counter()
    for scan in scan_inputs(paths, fmt):
        counters["files_skipped"] += len(scan.skipped)
        for cf in scan.files:
            yield from iter_clean_file(cf, options, counters)


def iter_clean_file(cf: CorpusFile, options, counters: Counter, batch_sessions: int = 1000
                    ) -> Iterator[CleanSession]:
    """Clean sessions of one corpus file (cleaned in batches of `batch_sessions` raw sessions)."""
    from dialogpt_zh.data.cleaning import clean_sessions

    path = cf.name
    batch: list[RawSession] = []

    def flush() -> Iterator[CleanSession]:
        for raw, pieces in zip(batch, clean_sessions([r.turns for r in batch], options, counters)):
            for turns in pieces:
                yield CleanSession(turns, cf.source, path, raw.line, raw.split)

    for raw in read_file(cf, counters):
        batch.append(raw)
        if len(batch) >= batch_sessions:
            yield from flush()
            batch = []
    if batch:
        yield from flush()
