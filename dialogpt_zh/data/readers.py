"""Corpus readers: paths -> a stream of raw sessions (turns + source, file, line, the source's own split).

Formats (`--format`; `auto` picks by extension, then by content):

| name              | files            | layout                                                              |
|-------------------|------------------|---------------------------------------------------------------------|
| `chitchat`        | `.txt`           | GPT2-chitchat train.txt: one utterance per line, blank line between sessions (LF/CRLF) |
| `tsv`             | `.tsv`, `.txt`   | one session per line, turns separated by TAB (LCCC toy_train.txt)   |
| `lccc-json`       | `.json`          | a list of sessions (lists of utterances), or a dict of splits of such lists |
| `kdconv-json`     | `.json`          | a list (or dict of splits) of `{"messages": [{"message": ...}, ...]}`; `attrs` ignored |
| `chat-json`       | `.json`          | a list (or dict of splits) of chat records: `{"messages": [{"role", "content"}]}` (OpenAI) or `{"conversations": [{"from", "value"}]}` (ShareGPT) |
| `chat-jsonl`      | `.jsonl`, `.ndjson` | one chat record per line (JSON Lines)                            |
| `chatterbot-yaml` | `.yml`, `.yaml`  | `conversations: [[utterance, ...], ...]`                            |
| `conv`            | `.conv`          | subtitle dialogues: `E` starts a session, `M text` is an utterance  |

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

Bad input raises `UserError` with file and line: a missing path, a directory without corpus files, an
unknown format, bytes that are not UTF-8, malformed JSON (a JSON Lines line included) or YAML, a corrupt
archive. Malformed *records* inside a well-formed file (a session that is not a list of strings, a chat
record without a messages list, a `.conv` line that is neither `E` nor `M ...`) are skipped and counted
(`record_malformed`, `line_malformed`).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import zipfile
import zlib
from collections import Counter
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

from dialogpt_zh.errors import UserError

FORMATS = ("chitchat", "tsv", "lccc-json", "kdconv-json", "chat-json", "chat-jsonl", "chatterbot-yaml", "conv")
CORPUS_EXTENSIONS = {".txt": None, ".tsv": "tsv", ".json": None, ".jsonl": "chat-jsonl", ".ndjson": "chat-jsonl",
                     ".yml": "chatterbot-yaml", ".yaml": "chatterbot-yaml", ".conv": "conv"}
# chat messages that are not turns of the dialogue (counted, not read), and the speaker roles we know
# (any other role is still a turn, counted `message_role_unknown`)
CHAT_SYSTEM_ROLES = frozenset({"system", "developer"})
CHAT_TOOL_ROLES = frozenset({"tool", "function", "ipython", "observation"})
CHAT_SPEAKER_ROLES = frozenset({"user", "assistant", "human", "gpt", "bot", "model", "chatgpt", "client",
                                "counselor", "counsellor", "patient", "doctor", "speaker"})
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
    """A file to read: its format, the source (input) it belongs to and its own split (from its name).

    `path` is the file on disk; `member` names a file inside the zip archive `path`. A `.gz` path (or
    member) is read through gzip. Everything is streamed, never unpacked to disk."""

    path: Path
    format: str
    source: str
    split: str | None
    member: str | None = None

    @property
    def name(self) -> str:
        """How messages and the manifest name it: the path, or `archive.zip:member.txt`."""
        return f"{self.path}:{self.member}" if self.member is not None else str(self.path)

    @property
    def inner_name(self) -> str:
        """The file name of the content: `train.txt.gz` -> `train.txt`, a zip member's own name."""
        return _strip_gz(Path(self.member).name if self.member is not None else self.path.name)


@dataclass
class InputScan:
    """What an input path resolved to: corpus files, and files skipped as not corpus files."""

    path: Path
    source: str
    files: list[CorpusFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    licence: str = "none stated"  # see corpus_licence
    licence_file: str | None = None


def _strip_gz(name: str) -> str:
    return name[:-3] if name.lower().endswith(".gz") else name


def split_from_name(path: Path | str) -> str | None:
    """A split named in a file name: `toy_valid.txt` -> "valid", `dev.json.gz` -> "dev", else None."""
    for token in _SPLIT_TOKEN_RE.findall(Path(_strip_gz(Path(path).name)).stem.lower()):
        if token in SPLIT_NAMES:
            return token
    return None


# ---------------------------------------------------------------- compressed input

class _GuardedReader(io.RawIOBase):
    """Reads a decompressing stream; a corrupt or truncated archive becomes a UserError naming the file."""

    ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile)

    def __init__(self, f, name: str) -> None:
        self.f, self.name, self.done = f, name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self.f.read(min(len(b), 1 << 16))  # small reads: the error says where the damage starts
        except self.ERRORS as e:
            raise UserError(f"corrupt or truncated compressed data after {self.done:,} bytes of content "
                            f"({type(e).__name__}: {e})", path=self.name) from e
        n = len(data)
        b[:n] = data
        self.done += n
        return n


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"not a readable zip archive ({e})", path=path) from e


@contextmanager
def open_corpus_file(cf: CorpusFile) -> Iterator[BinaryIO]:
    """The (decompressed) bytes of a corpus file as a binary stream: plain, `.gz`, or a zip member."""
    with ExitStack() as stack:
        if cf.member is not None:
            zf = stack.enter_context(_open_zip(cf.path))
            try:
                f = stack.enter_context(zf.open(cf.member))
            except (KeyError, zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as e:
                raise UserError(f"cannot read this archive member ({e})", path=cf.name) from e
            inner = cf.member
        else:
            f = stack.enter_context(open(cf.path, "rb"))
            inner = cf.path.name
        if inner.lower().endswith(".gz"):
            f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        if cf.member is not None or inner.lower().endswith(".gz"):
            f = io.BufferedReader(_GuardedReader(f, cf.name), 1 << 16)
        yield f


def _zip_members(path: Path) -> list[str]:
    """Names of the files in a zip archive, in archive order (directories and macOS metadata left out)."""
    with _open_zip(path) as zf:
        return [i.filename for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]


def wide_encoding(data: bytes) -> str | None:
    """"UTF-16" / "UTF-32" when the first bytes of a file say so (a BOM, or NULs at every other byte, as
    ASCII has in UTF-16), else None."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    sample = data[:4096]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if min(even, odd) == 0 and max(even, odd) >= 4 and max(even, odd) * 4 >= len(sample) // 2:
        return "UTF-16"
    return None


def _head(cf: CorpusFile, size: int = 65536) -> str:
    with open_corpus_file(cf) as f:
        data = f.read(size)
    wide = wide_encoding(data)
    if wide:
        raise UserError(f"{wide} text, not UTF-8; convert it first, e.g. `iconv -f {wide} -t UTF-8`", path=cf.name)
    if b"\x00" in data:
        return "\x00"
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


def _is_chat_record(obj: object) -> bool:
    """A chat-messages record: {"messages": [{"role", "content"}...]} or {"conversations": [{"from", "value"}...]}."""
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("conversations"), list):
        return True
    messages = obj.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    return isinstance(first, dict) and "message" not in first and any(
        k in first for k in ("role", "content", "from", "value"))


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
            elif not _is_corpus_name(name):
                scan.skipped.append(str(p))
            else:
                _add_file(scan, CorpusFile(p, "", scan.source, split_from_name(p)), fmt, explicit=False)
    if not scan.files:
        what = f" (skipped: {', '.join(Path(s).name for s in scan.skipped[:5])})" if scan.skipped else ""
        raise UserError("directory holds no corpus files (.txt .tsv .json .jsonl .yml .yaml .conv, also as .gz, "
                        f"or in .zip){what}", path=path)
    return scan


# ---------------------------------------------------------------- licence of an input

LICENCE_FILE_NAMES = ("LICENSE", "LICENSE.MD", "LICENSE.TXT", "LICENCE", "LICENCE.MD", "LICENCE.TXT",
                      "COPYING", "COPYING.MD", "COPYING.TXT")
# (SPDX id, phrases that must all occur in the lower-cased, whitespace-collapsed text); first match wins,
# so the more specific licences come before those whose text they contain
_LICENCE_RULES = (
    ("AGPL-3.0", ("gnu affero general public license", "version 3")),
    ("LGPL-3.0", ("gnu lesser general public license", "version 3")),
    ("LGPL-2.1", ("gnu lesser general public license", "version 2.1")),
    ("GPL-3.0", ("gnu general public license", "version 3")),
    ("GPL-2.0", ("gnu general public license", "version 2")),
    ("Apache-2.0", ("apache license", "version 2.0")),
    ("MPL-2.0", ("mozilla public license", "2.0")),
    ("CC0-1.0", ("cc0 1.0",)),
    ("CC-BY-NC-SA-4.0", ("attribution-noncommercial-sharealike 4.0",)),
    ("CC-BY-NC-4.0", ("attribution-noncommercial 4.0",)),
    ("CC-BY-SA-4.0", ("attribution-sharealike 4.0",)),
    ("CC-BY-4.0", ("attribution 4.0 international",)),
    ("Unlicense", ("free and unencumbered software released into the public domain",)),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",)),
    ("ISC", ("permission to use, copy, modify, and/or distribute this software for any purpose",)),
    ("MIT", ("permission is hereby granted, free of charge",)),
)
_SPDX_LINE_RE = re.compile(r"SPDX-License-Identifier:\s*([A-Za-z0-9.+-]+)")


def recognise_licence(text: str) -> str | None:
    """An SPDX-style id for a licence text (simple phrase matching), or None."""
    m = _SPDX_LINE_RE.search(text)
    if m:
        return m.group(1)
    flat = " ".join(text.lower().split())
    for spdx, phrases in _LICENCE_RULES:
        if all(p in flat for p in phrases):
            return spdx
    return None


def corpus_licence(path: Path) -> tuple[str, str | None]:
    """(licence, licence file) of an input: from a LICENSE/LICENCE/COPYING file (any case, optionally .md
    or .txt) in the input directory, or in a file input's own directory. The licence is an SPDX-style id,
    "unrecognised licence file: NAME", or "none stated"."""
    directory = path if path.is_dir() else path.parent
    try:
        candidates = sorted((p for p in directory.iterdir() if p.name.upper() in LICENCE_FILE_NAMES and p.is_file()),
                            key=lambda p: (LICENCE_FILE_NAMES.index(p.name.upper()), p.name))
    except OSError:
        candidates = []
    if not candidates:
        return "none stated", None
    found = candidates[0]
    with open(found, "rb") as f:
        text = f.read(1 << 18).decode("utf-8", errors="replace")
    return recognise_licence(text) or f"unrecognised licence file: {found.name}", str(found)


def _decode_error(path: Path, e: UnicodeDecodeError, line: int) -> UserError:
    wide = wide_encoding(e.object) if line == 1 and isinstance(e.object, bytes) else None
    if wide:
        return UserError(f"{wide} text, not UTF-8; convert it first, e.g. `iconv -f {wide} -t UTF-8`", path=path)
    return UserError(f"not UTF-8 text ({e.reason} at byte {e.start}); convert it first, e.g. "
                     f"`iconv -f gbk -t utf-8`", path=path, line=line)


def _iter_line_blocks(cf: CorpusFile, block_size: int = 1 << 20) -> Iterator[tuple[int, list[str]]]:
    """(number of the first line, lines without line ends) per block of a UTF-8 file; LF, CRLF and
    mixtures; BOM dropped. Decoding whole blocks is much faster than line by line."""
    lineno = 1
    rest = b""
    with open_corpus_file(cf) as f:
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
                raise _decode_error(cf.name, e, lineno + data.count(b"\n", 0, e.start)) from e
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


def _iter_lines(cf: CorpusFile) -> Iterator[tuple[int, str]]:
    """(line number, text without line end) of a UTF-8 file."""
    for first, lines in _iter_line_blocks(cf):
        yield from enumerate(lines, first)


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


class _JsonStream:
    """Reads the top level of a big JSON file one element at a time (memory: one element + a chunk)."""

    CHUNK = 1 << 20
    MAX_VALUE = 64 << 20

    def __init__(self, cf: CorpusFile, f) -> None:
        self.cf, self.path, self.f = cf, cf.name, f
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base = 1  # line number at buf[0]
        self.decoder = json.JSONDecoder()

    def _read(self, size: int = CHUNK) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.f.read(size)
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
        line = _first_bad_line(self.cf)
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
                # maybe the value continues past the chunk (one session may hold up to MAX_VALUE chars):
                # read as much again as is pending, so a big value is re-parsed a few times, not once a chunk
                pending = len(self.buf) - self.pos
                if pending < self.MAX_VALUE and self._read(max(self.CHUNK, pending)):
                    continue
                raise self.error(e.msg, e.pos) from e
            except RecursionError as e:
                raise self.error("nested too deeply") from e
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


def _first_bad_line(cf: CorpusFile) -> int:
    with open_corpus_file(cf) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _iter_json_sessions(cf: CorpusFile) -> Iterator[tuple[object, int, str | None]]:
    """(element, line, split key) of a top-level list, or of each list in a top-level dict of splits."""
    path = cf.name
    with open_corpus_file(cf) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        stream = _JsonStream(cf, f)
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


def read_lccc_json(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    for obj, line, split in _iter_json_sessions(cf):
        if isinstance(obj, list) and all(isinstance(t, str) for t in obj):
            yield RawSession(obj, line, split)
        else:
            counters["record_malformed"] += 1


def read_kdconv_json(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    for obj, line, split in _iter_json_sessions(cf):
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list):
            counters["record_malformed"] += 1
            continue
        turns = []
        for m in messages:
            text = m.get("message") if isinstance(m, dict) else None
            turns.append(text if isinstance(text, str) else None)  # None: counted by cleaning
        yield RawSession(turns, line, split)


def _content_text(content: object) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI content list joined by a space; None for
    anything else (null, a number, an image-only list), which cleaning counts as `utterance_not_text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return " ".join(texts) if texts else None
    return None


def chat_turns(record: object, counters: Counter) -> list | None:
    """The turns of a chat-messages record, or None when it is not one (the caller counts record_malformed).

    `{"messages": [{"role", "content"}, ...]}` (OpenAI) or `{"conversations": [{"from", "value"}, ...]}`
    (ShareGPT); either key pair works in either list. Messages become turns in order, whoever speaks
    (consecutive messages of one speaker stay separate turns). Not turns, counted: system/developer
    messages (`message_system_skipped`), tool/function results (`message_tool_skipped`). Kept, counted:
    a role outside CHAT_SPEAKER_ROLES (`message_role_unknown`), no string role (`message_role_missing`).
    A message that is not an object or has no text content gives a None turn (cleaning counts
    `utterance_not_text` and splits the session there); empty text likewise splits it."""
    if not isinstance(record, dict):
        return None
    messages = record.get("messages")
    if messages is None:
        messages = record.get("conversations")
    if not isinstance(messages, list):
        return None
    turns: list = []
    for m in messages:
        if not isinstance(m, dict):
            turns.append(None)
            continue
        role = m.get("role", m.get("from"))
        if isinstance(role, str):
            role = role.strip().lower()
            if role in CHAT_SYSTEM_ROLES:
                counters["message_system_skipped"] += 1
                continue
            if role in CHAT_TOOL_ROLES:
                counters["message_tool_skipped"] += 1
                continue
            if role not in CHAT_SPEAKER_ROLES:
                counters["message_role_unknown"] += 1
        else:
            counters["message_role_missing"] += 1
        turns.append(_content_text(m["content"] if "content" in m else m.get("value")))
    if not turns:
        counters["record_no_turns"] += 1
    return turns


def read_chat_json(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    for obj, line, split in _iter_json_sessions(cf):
        turns = chat_turns(obj, counters)
        if turns is None:
            counters["record_malformed"] += 1
        elif turns:
            yield RawSession(turns, line, split)


def read_chat_jsonl(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    """One chat record per line; blank lines are not records; a line that is not JSON is fatal (file:line),
    like malformed JSON in any other format (usually a truncated or concatenated file)."""
    decode = json.JSONDecoder().decode
    for first, lines in _iter_line_blocks(cf):
        for i, text in enumerate(lines):
            if not text or text.isspace():
                continue
            try:
                obj = decode(text)
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON Lines record: {e.msg} (column {e.colno})",
                                path=cf.name, line=first + i) from e
            except RecursionError as e:
                raise UserError("malformed JSON Lines record: nested too deeply", path=cf.name, line=first + i) from e
            turns = chat_turns(obj, counters)
            if turns is None:
                counters["record_malformed"] += 1
            elif turns:
                yield RawSession(turns, first + i)


def read_chatterbot_yaml(cf: CorpusFile, counters: Counter) -> Iterator[RawSession]:
    import yaml

    path = cf.name
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open_corpus_file(cf) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            root = yaml.compose(f, Loader=loader)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e, _first_bad_line(cf)) from e
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
