"""Corpus files: what an input resolves to (`CorpusFile`, `RawSession`, `InputScan`), their bytes (plain,
`.gz`, or a `.zip` member, streamed: never unpacked to disk), their lines (UTF-8; a decoding error names the
file and line), and the licence an input states. The formats themselves are read by `dialogpt_zh.data.readers`
(line formats, scanning, the public entry) and `dialogpt_zh.data.chat_readers` (JSON, JSON Lines, YAML).
"""
from __future__ import annotations

import gzip
import io
import re
import zipfile
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from dialogpt_zh.errors import UserError

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
    notes: list[str] = field(default_factory=list)  # what the preprocessor tells the person about this input


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
