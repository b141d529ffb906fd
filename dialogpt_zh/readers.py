"""Corpus readers: paths -> a stream of raw sessions (turns + source, file, line, the source's own split).

Formats (`--format`; `auto` picks by extension, then by content):

| name              | files            | layout                                                              |
|-------------------|------------------|---------------------------------------------------------------------|
| `chitchat`        | `.txt`           | GPT2-chitchat train.txt: one utterance per line, blank line between sessions (LF/CRLF) |
| `tsv`             | `.tsv`, `.txt`   | one session per line, turns separated by TAB (LCCC toy_train.txt)   |
| `lccc-json`       | `.json`          | a list of sessions (lists of utterances), or a dict of splits of such lists |
| `kdconv-json`     | `.json`          | a list (or dict of splits) of `{"messages": [{"message": ...}, ...]}`; `attrs` ignored |
| `chatterbot-yaml` | `.yml`, `.yaml`  | `conversations: [[utterance, ...], ...]`                            |
| `conv`            | `.conv`          | subtitle dialogues: `E` starts a session, `M text` is an utterance  |

A `.txt` file is `tsv` when most of its first lines contain a TAB, `conv` when it starts with an `E` line,
else `chitchat`; a `.json` file is `kdconv-json` when its first session is an object, else `lccc-json`.
Directories are walked recursively in sorted order; files of other types (LICENSE, README.md, ...) are
skipped and reported. Everything streams: line formats line by line, JSON one session at a time (a small
incremental parser over `json.JSONDecoder.raw_decode`), so memory does not grow with the file. YAML files
are loaded whole (ChatterBot files are a few KB).

Bad input raises `UserError` with file and line: a missing path, a directory without corpus files, an
unknown format, bytes that are not UTF-8, malformed JSON or YAML. Malformed *records* inside a well-formed
file (a session that is not a list of strings, a `.conv` line that is neither `E` nor `M ...`) are skipped
and counted (`record_malformed`, `line_malformed`).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dialogpt_zh.errors import UserError

FORMATS = ("chitchat", "tsv", "lccc-json", "kdconv-json", "chatterbot-yaml", "conv")
CORPUS_EXTENSIONS = {".txt": None, ".tsv": "tsv", ".json": None, ".yml": "chatterbot-yaml",
                     ".yaml": "chatterbot-yaml", ".conv": "conv"}
SPLIT_NAMES = ("train", "valid", "validation", "val", "dev", "test")
_SPLIT_TOKEN_RE = re.compile(r"[A-Za-z]+")


@dataclass(slots=True)
class RawSession:
    """One session as read: turns are the raw strings (any object for malformed records)."""

    turns: list
    line: int
    split: str | None = None


@dataclass(slots=True)
class CorpusFile:
    """A file to read: its format, the source (input) it belongs to and its own split (from its name)."""

    path: Path
    format: str
    source: str
    split: str | None


@dataclass
class InputScan:
    """What an input path resolved to: corpus files, and files skipped as not corpus files."""

    path: Path
    source: str
    files: list[CorpusFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def split_from_name(path: Path) -> str | None:
    """A split named in a file name: `toy_valid.txt` -> "valid", `dev.json` -> "dev", else None."""
    for token in _SPLIT_TOKEN_RE.findall(path.stem.lower()):
        if token in SPLIT_NAMES:
            return token
    return None


def _head(path: Path, size: int = 65536) -> str:
    with open(path, "rb") as f:
        data = f.read(size)
    if b"\x00" in data:
        return "\x00"
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


def sniff_format(path: Path, explicit_only: bool = False) -> str | None:
    """Guess a file's format from its extension and first bytes; None when it cannot tell."""
    ext = path.suffix.lower()
    if ext in CORPUS_EXTENSIONS and CORPUS_EXTENSIONS[ext] is not None:
        return CORPUS_EXTENSIONS[ext]
    if ext not in CORPUS_EXTENSIONS and not explicit_only:
        return None
    head = _head(path)
    if "\x00" in head:
        return None
    stripped = head.lstrip()
    if ext == ".json" or (ext not in CORPUS_EXTENSIONS and stripped[:1] in ("[", "{")):
        if stripped[:1] == "{":
            # a dict of splits: look at the first value's first element
            m = re.search(r":\s*\[\s*(\S)", stripped)
            first = m.group(1) if m else "["
        else:
            first = stripped[1:].lstrip()[:1]
        if ext == ".json" or first in ("[", "{", "]"):
            return "kdconv-json" if first == "{" else "lccc-json"
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


def scan_input(path: str | Path, fmt: str = "auto", source: str | None = None) -> InputScan:
    """Resolve one input (file or directory) into corpus files with their formats."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}", field="format")
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or directory", path=path)
    scan = InputScan(path=path, source=source or (path.resolve().name if path.is_dir() else path.name))
    if path.is_file():
        detected = fmt if fmt != "auto" else sniff_format(path, explicit_only=True)
        if detected is None:
            raise UserError(f"cannot tell the corpus format; pass --format (one of {', '.join(FORMATS)})",
                            path=path)
        scan.files.append(CorpusFile(path, detected, scan.source, split_from_name(path)))
        return scan
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in CORPUS_EXTENSIONS:
                scan.skipped.append(str(p))
                continue
            detected = fmt if fmt != "auto" else sniff_format(p)
            if detected is None:
                scan.skipped.append(str(p))
                continue
            scan.files.append(CorpusFile(p, detected, scan.source, split_from_name(p)))
    if not scan.files:
        what = f" (skipped: {', '.join(Path(s).name for s in scan.skipped[:5])})" if scan.skipped else ""
        raise UserError(f"directory holds no corpus files (.txt .tsv .json .yml .yaml .conv){what}", path=path)
    return scan


def _decode_error(path: Path, e: UnicodeDecodeError, line: int) -> UserError:
    return UserError(f"not UTF-8 text ({e.reason} at byte {e.start}); convert it first, e.g. "
                     f"`iconv -f gbk -t utf-8`", path=path, line=line)


def _iter_line_blocks(path: Path, block_size: int = 1 << 20) -> Iterator[tuple[int, list[str]]]:
    """(number of the first line, lines without line ends) per block of a UTF-8 file; LF, CRLF and
    mixtures; BOM dropped. Decoding whole blocks is much faster than line by line."""
    lineno = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(block_size)
            eof = not block
            data = rest + block
            if not data:
                return
            if eof:
                rest = b""
            else:
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                data, rest = data[:cut + 1], data[cut + 1:]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, e, lineno + data.count(b"\n", 0, e.start)) from e
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if "\r" in text:
                text = text.replace("\r\n", "\n")
                lines = [ln.rstrip("\r") for ln in text.split("\n")]
            else:
                lines = text.split("\n")
            if text.endswith("\n"):
                lines.pop()
            yield lineno, lines
            lineno += len(lines)
            if eof:
                return


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without line end) of a UTF-8 file."""
    for first, lines in _iter_line_blocks(path):
        yield from enumerate(lines, first)


def read_chitchat(path: Path, counters: Counter) -> Iterator[RawSession]:
    turns: list[str] = []
    start = 0
    for lineno, text in _iter_lines(path):
        if text.strip():
            if not turns:
                start = lineno
            turns.append(text)
        elif turns:
            yield RawSession(turns, start)
            turns = []
    if turns:
        yield RawSession(turns, start)


def read_tsv(path: Path, counters: Counter) -> Iterator[RawSession]:
    for first, lines in _iter_line_blocks(path):
        for i, text in enumerate(lines):
            if text and not text.isspace():
                yield RawSession(text.split("\t"), first + i)


def read_conv(path: Path, counters: Counter) -> Iterator[RawSession]:
    turns: list[str] = []
    start = 0
    for first, lines in _iter_line_blocks(path):
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


class _JsonStream:
    """Reads the top level of a big JSON file one element at a time (memory: one element + a chunk)."""

    CHUNK = 1 << 20
    MAX_VALUE = 64 << 20

    def __init__(self, path: Path, f) -> None:
        self.path, self.f = path, f
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base = 1  # line number at buf[0]
        self.decoder = json.JSONDecoder()

    def _read(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.f.read(self.CHUNK)
        except UnicodeDecodeError as e:
            raise self._decode_failure(e) from e
        if not chunk:
            self.eof = True
            return False
        if self.pos > self.CHUNK:
            self.line_base += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        if self.line_base == 1 and self.pos == 0 and not self.buf:
            chunk = chunk.lstrip("\ufeff")
        self.buf += chunk
        return True

    def _decode_failure(self, e: UnicodeDecodeError) -> UserError:
        line = _first_bad_line(self.path)
        return _decode_error(self.path, e, line)

    def line(self, pos: int | None = None) -> int:
        return self.line_base + self.buf.count("\n", 0, self.pos if pos is None else pos)

    def error(self, message: str, pos: int | None = None) -> UserError:
        return UserError(f"malformed JSON: {message}", path=self.path, line=self.line(pos))

    def peek(self) -> str:
        """Next non-whitespace character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if c == "" or c not in chars:
            found = "end of file" if c == "" else repr(c)
            raise self.error(f"expected {' or '.join(repr(x) for x in chars)}, found {found}")
        self.pos += 1
        return c

    def value(self):
        """Decode the next value; returns (value, line where it starts)."""
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # maybe the value continues past the chunk (one session may hold up to MAX_VALUE chars)
                if len(self.buf) - self.pos < self.MAX_VALUE and self._read():
                    continue
                raise self.error(e.msg, e.pos) from e
            if end >= len(self.buf) and not self.eof and self._read():
                continue  # a number could continue in the next chunk
            line = self.line()
            self.pos = end
            return obj, line

    def items(self) -> Iterator[tuple[object, int]]:
        """Elements of the array starting here."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]") == "]":
                return


def _first_bad_line(path: Path) -> int:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _iter_json_sessions(path: Path) -> Iterator[tuple[object, int, str | None]]:
    """(element, line, split key) of a top-level list, or of each list in a top-level dict of splits."""
    with open(path, "r", encoding="utf-8", newline="") as f:
        stream = _JsonStream(path, f)
        first = stream.peek()
        if first == "[":
            for obj, line in stream.items():
                yield obj, line, None
        elif first == "{":
            stream.pos += 1
            if stream.peek() == "}":
                stream.pos += 1
            else:
                while True:
                    key, _ = stream.value()
                    if not isinstance(key, str):
                        raise stream.error("expected a split name (a string key)")
                    stream.expect(":")
                    if stream.peek() != "[":
                        raise UserError("expected a list of sessions", path=path, line=stream.line(), field=key)
                    for obj, line in stream.items():
                        yield obj, line, key
                    if stream.expect(",}") == "}":
                        break
        else:
            raise stream.error("expected a list of sessions or a dict of splits"
                               if first else "empty file")
        if stream.peek() != "":
            raise stream.error("extra data after the top-level value")


def read_lccc_json(path: Path, counters: Counter) -> Iterator[RawSession]:
    for obj, line, split in _iter_json_sessions(path):
        if isinstance(obj, list) and all(isinstance(t, str) for t in obj):
            yield RawSession(obj, line, split)
        else:
            counters["record_malformed"] += 1


def read_kdconv_json(path: Path, counters: Counter) -> Iterator[RawSession]:
    for obj, line, split in _iter_json_sessions(path):
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list):
            counters["record_malformed"] += 1
            continue
        turns = []
        for m in messages:
            text = m.get("message") if isinstance(m, dict) else None
            turns.append(text if isinstance(text, str) else None)  # None: counted by cleaning
        yield RawSession(turns, line, split)


def read_chatterbot_yaml(path: Path, counters: Counter) -> Iterator[RawSession]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, "r", encoding="utf-8") as f:
            root = yaml.compose(f, Loader=loader)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e, _first_bad_line(path)) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"malformed YAML: {problem}", path=path,
                        line=mark.line + 1 if mark is not None else None) from e
    if not isinstance(root, yaml.MappingNode):
        raise UserError("expected a mapping with a `conversations:` list", path=path,
                        line=root.start_mark.line + 1 if root is not None else 1)
    convs = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        raise UserError("no `conversations:` list", path=path, line=root.start_mark.line + 1,
                        field="conversations")
    for conv in convs.value:
        if not isinstance(conv, yaml.SequenceNode):
            counters["record_malformed"] += 1
            continue
        turns = [t.value if isinstance(t, yaml.ScalarNode) else None for t in conv.value]
        yield RawSession(turns, conv.start_mark.line + 1)


READERS = {"chitchat": read_chitchat, "tsv": read_tsv, "lccc-json": read_lccc_json,
           "kdconv-json": read_kdconv_json, "chatterbot-yaml": read_chatterbot_yaml, "conv": read_conv}


def read_file(corpus_file: CorpusFile, counters: Counter | None = None) -> Iterator[RawSession]:
    """Raw sessions of one corpus file; the split is the record's (JSON dict key) or the file name's."""
    counters = counters if counters is not None else Counter()
    for raw in READERS[corpus_file.format](corpus_file.path, counters):
        if raw.split is None:
            raw.split = corpus_file.split
        counters["sessions_read"] += 1
        yield raw


def scan_inputs(paths: Iterable[str | Path], fmt: str = "auto") -> list[InputScan]:
    """Scan several inputs; sources with the same name get a `#2`, `#3` suffix."""
    scans: list[InputScan] = []
    seen: Counter = Counter()
    for p in paths:
        scan = scan_input(p, fmt)
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
    from dialogpt_zh.cleaning import CleaningOptions

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
    from dialogpt_zh.cleaning import clean_sessions

    path = str(cf.path)
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
