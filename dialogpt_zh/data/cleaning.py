"""Utterance normalisation and session cleaning, every change counted by reason.

`normalize_text` is THE per-utterance normaliser: the preprocessor applies it to corpus text and the chat
engine to user input, so training and serving see text the same way. Steps, in order (counter names in
brackets, counted by `clean_session` / `normalize_counted`):

1. Unicode NFKC (full-width letters/digits/punctuation -> ASCII, compatibility forms) [nfkc_changed:
   utterances changed].
2. Terminal escape sequences (ANSI colours `ESC[31m`, cursor moves, OSC titles) removed whole
   [ansi_escapes_removed], so no `[31m` is left behind; then control and format characters removed
   [control_chars_removed: runs removed]; every run of whitespace
   (tabs, newlines, NBSP, ideographic space) becomes one ASCII space; ends stripped.
3. `_url_` placeholders and URLs (`http(s)://...`, `www....`) dropped [url_removed].
4. The space rule [char_split_joined]: a line is *char-split* (LCCC style, `今 天 好 ， h e l l o`) when
   it has at least two space-separated tokens and at least 80% of them are single characters; then every
   space is removed (`今天好，hello`). Other lines keep their (collapsed) spaces, so `Breaking Bad` in
   KdConv or a subtitle stays two words. The rule looks at the line, not at the source, so it also applies
   to user input. It only ever removes spaces: no other character is lost.
5. URLs again (a char-split URL only becomes recognisable after joining) [url_removed].
6. Runs of one repeated character longer than `max_repeat` (default 4) capped: `哈哈哈哈哈哈` -> `哈哈哈哈`
   [repeat_capped: runs capped]. Digits are not capped (`1000000` is a number, not laughter).
7. Personal data masked with placeholder words [pii_email_masked, pii_id_card_masked, pii_phone_masked]:
   e-mail addresses -> `【邮箱】`, mainland ID-card numbers (18 digits, last may be X; or 15 digits) ->
   `【身份证号】`, phone numbers (mobile `1[3-9]` + 9 digits, optional +86; landline `0xx(x)-xxxxxxx(x)`)
   -> `【电话】`. The placeholders are ordinary CJK characters in full-width brackets: a char tokenizer
   learns them like any text, a BERT-Chinese vocab has every character, lower-casing cannot change them,
   and `normalize_text` leaves them as they are (idempotent).

Session cleaning (`clean_session`) then: truncates utterances longer than `max_utterance_chars`
[utterance_truncated]; drops empty utterances and splits the session there instead of joining unrelated
turns [utterance_empty_dropped, session_split_at_empty]; drops pieces with fewer than `min_turns` turns
[session_too_short, turns_in_short_sessions]; drops sessions containing a blocklisted word
[session_blocklisted]. Exact duplicate sessions are removed by the preprocessor (before splitting).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dialogpt_zh.errors import UserError

EMAIL_PLACEHOLDER = "【邮箱】"
ID_CARD_PLACEHOLDER = "【身份证号】"
PHONE_PLACEHOLDER = "【电话】"

# Cc (except whitespace, handled below) and common Cf format characters (zero-width, bidi marks, BOM).
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b-\u200f\u202a-\u202e"
                         "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]+")
# ANSI/VT escape sequences: CSI (ESC [ or C1 \x9b ... final byte), OSC (ESC ] ... BEL or ESC \), two-byte ESC x
_ANSI_RE = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b[ -~]")
_SPACE_RE = re.compile(r"\s+")
_URL_RE = re.compile(r"(?:https?://|www\.)[!-~]+", re.IGNORECASE)
_EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_ID_CARD_RE = re.compile(r"(?<![0-9A-Za-z])(?:[1-9][0-9]{5}(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])"
                         r"(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]|[1-9][0-9]{14})(?![0-9A-Za-z])")
_PHONE_RE = re.compile(r"(?<![0-9A-Za-z+])(?:(?:\+?86[- ]?)?1[3-9][0-9]{9}|0[0-9]{2,3}-[0-9]{7,8})(?![0-9A-Za-z])")
_PII_HINT_RE = re.compile(r"[0-9]{7}|@")  # cheap gate: every pattern needs 7 digits in a row or an @
_URL_PLACEHOLDER = "_url_"
_URL_HINT_RE = re.compile(r"_url_|://|www\.", re.IGNORECASE)


MAX_REPEAT = 2**31 - 1  # a larger count is more than a `re` pattern can repeat (an OverflowError)


@dataclass
class CleaningOptions:
    """Session cleaning settings (the preprocessor's flags map onto these)."""

    max_utterance_chars: int = 120
    max_repeat: int = 4
    min_turns: int = 2
    mask_pii: bool = True
    blocklist: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_utterance_chars < 1:
            raise UserError("must be at least 1", field="max_utterance_chars")
        if not 1 <= self.max_repeat <= MAX_REPEAT:
            raise UserError(f"must be in [1, {MAX_REPEAT}], got {self.max_repeat}", field="max_repeat")
        if self.min_turns < 1:
            raise UserError("must be at least 1", field="min_turns")
        words = sorted({normalize_text(w) for w in self.blocklist} - {""}, key=len, reverse=True)
        self.blocklist = tuple(words)
        self._block_re = re.compile("|".join(map(re.escape, words))) if words else None
        self._repeat_re = _repeat_re(self.max_repeat)


_REPEAT_RES: dict[int, re.Pattern] = {}


def _repeat_re(max_repeat: int) -> re.Pattern:
    if max_repeat not in _REPEAT_RES:
        # any character but digits, spaces and the placeholder brackets, repeated more than max_repeat times
        _REPEAT_RES[max_repeat] = re.compile(r"([^0-9\s【】])\1{%d,}" % max_repeat)
    return _REPEAT_RES[max_repeat]


def blocklist_missing_reason(path: Path) -> str:
    """Why a blocklist path is not a readable file, in a few words."""
    return "is a directory, not a file of words" if path.is_dir() else "file not found"


def load_blocklist(path: str | Path) -> list[str]:
    """Words of a blocklist file: one per line (UTF-8, BOM allowed), blank lines and `#` comments ignored.

    The one reader of the format: the preprocessor's `--blocklist` and the engine's `MMISettings.blocklist`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"blocklist {blocklist_missing_reason(path)}", path=path)
    words = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path, line=lineno) from e
            if line and not line.startswith("#"):
                words.append(line)
    return words


def is_char_split(text: str) -> bool:
    """True for LCCC-style text: >= 2 space-separated tokens and >= 80% of them single characters."""
    tokens = text.split(" ")
    if len(tokens) < 2:
        return False
    single = sum(1 for t in tokens if len(t) == 1)
    return single * 5 >= len(tokens) * 4


def join_char_split(text: str) -> str:
    """The space rule alone: remove all spaces of a char-split line, keep every other line as it is."""
    return text.replace(" ", "") if is_char_split(text) else text


def _remove_urls(text: str) -> tuple[str, int]:
    n = 0
    while _URL_PLACEHOLDER in text:  # a loop, since removing one can join two halves into another
        n += text.count(_URL_PLACEHOLDER)
        text = text.replace(_URL_PLACEHOLDER, "")
    text, k = _URL_RE.subn("", text)
    return text, n + k


_BLANKS_RE = re.compile(r"[^\S\n]+")  # whitespace runs except the batch's line separator
_EDGE_SPACES_RE = re.compile(r" ?\n ?")
_SPACED_LINE_RE = re.compile(r"^[^\n]* [^\n]*$", re.MULTILINE)


def strip_controls(text: str) -> str:
    """`text` without terminal escape sequences and control or format characters (step 2 of `normalize_text`
    alone, whitespace kept): what a person typed, safe to print to a terminal and to keep as they wrote it."""
    return _CONTROL_RE.sub("", _ANSI_RE.sub("", text))


def normalize_many(texts: Sequence[str], counters: Counter | None = None, max_repeat: int = 4,
                   mask_pii: bool = True) -> list[str]:
    """`normalize_text` of many utterances at once (the same steps, run over one joined string).

    Every step is line-local: no pattern matches a newline, so joining with "\n" and splitting afterwards
    gives exactly the per-utterance result, at a fraction of the per-call cost. Newlines inside an
    utterance are whitespace anyway and become spaces first.
    """
    if not texts:
        return []
    counters = counters if counters is not None else Counter()
    joined = "\n".join(texts)
    if joined.count("\n") != len(texts) - 1:
        joined = "\n".join(t.replace("\n", " ") for t in texts)
    out = unicodedata.normalize("NFKC", joined)
    if out != joined:
        counters["nfkc_changed"] += sum(1 for a, b in zip(joined.split("\n"), out.split("\n")) if a != b)
    if "\x1b" in out or "\x9b" in out:
        out, k = _ANSI_RE.subn("", out)
        counters["ansi_escapes_removed"] += k
    out, k = _CONTROL_RE.subn("", out)
    counters["control_chars_removed"] += k
    out = _EDGE_SPACES_RE.sub("\n", _BLANKS_RE.sub(" ", out)).strip(" ")
    if _URL_HINT_RE.search(out):
        out, k = _remove_urls(out)
        if k:
            counters["url_removed"] += k
            out = _EDGE_SPACES_RE.sub("\n", _BLANKS_RE.sub(" ", out)).strip(" ")

    def join_line(m: re.Match) -> str:
        line = m.group(0)
        if not is_char_split(line):
            return line
        counters["char_split_joined"] += 1
        line, k = _remove_urls(line.replace(" ", ""))
        counters["url_removed"] += k
        return line

    if " " in out:
        out = _SPACED_LINE_RE.sub(join_line, out)
    out, k = _repeat_re(max_repeat).subn(lambda m: m.group(1) * max_repeat, out)
    counters["repeat_capped"] += k
    if mask_pii and _PII_HINT_RE.search(out):
        for regex, placeholder, name in ((_EMAIL_RE, EMAIL_PLACEHOLDER, "pii_email_masked"),
                                         (_ID_CARD_RE, ID_CARD_PLACEHOLDER, "pii_id_card_masked"),
                                         (_PHONE_RE, PHONE_PLACEHOLDER, "pii_phone_masked")):
            out, k = regex.subn(placeholder, out)
            counters[name] += k
    if not out.isascii() and not unicodedata.is_normalized("NFKC", out):
        # removing a character can bring a base letter and a combining mark together
        out = unicodedata.normalize("NFKC", out)
    return out.split("\n")


def normalize_counted(text: str, counters: Counter | None = None, max_repeat: int = 4,
                      mask_pii: bool = True) -> str:
    """`normalize_text` that also counts what it changed (see the module docstring for the steps)."""
    return normalize_many([text], counters, max_repeat, mask_pii)[0]


def normalize_text(text: str) -> str:
    """Normalise one utterance (corpus text or user input) exactly as the preprocessor does."""
    return normalize_many([text])[0]


def clean_sessions(sessions: Sequence[Sequence], options: CleaningOptions | None = None,
                   counters: Counter | None = None) -> list[list[list[str]]]:
    """`clean_session` of many raw sessions, normalising all their utterances in one batch."""
    options = options or CleaningOptions()
    counters = counters if counters is not None else Counter()
    flat: list[str] = []
    for turns in sessions:
        for raw in turns:
            if isinstance(raw, str):
                flat.append(raw)
            else:
                counters["utterance_not_text"] += 1
                flat.append("")
    texts = normalize_many(flat, counters, options.max_repeat, options.mask_pii)
    results = []
    pos = 0
    limit, min_turns, block_re = options.max_utterance_chars, options.min_turns, options._block_re
    for turns in sessions:
        n = len(turns)
        cleaned = texts[pos:pos + n]
        pos += n
        pieces: list[list[str]] = []
        current: list[str] = []
        for text in cleaned:
            if len(text) > limit:
                text = text[:limit].rstrip()
                counters["utterance_truncated"] += 1
            if not text:
                counters["utterance_empty_dropped"] += 1
                if current:
                    pieces.append(current)
                    current = []
                continue
            current.append(text)
        if current:
            pieces.append(current)
        if len(pieces) > 1:
            counters["session_split_at_empty"] += len(pieces) - 1
        kept = []
        for piece in pieces:
            if len(piece) < min_turns:
                counters["session_too_short"] += 1
                counters["turns_in_short_sessions"] += len(piece)
            elif block_re is not None and any(block_re.search(t) for t in piece):
                counters["session_blocklisted"] += 1
                counters["turns_in_blocklisted_sessions"] += len(piece)
            else:
                kept.append(piece)
        results.append(kept)
    return results


def clean_session(turns: Iterable, options: CleaningOptions | None = None,
                  counters: Counter | None = None) -> list[list[str]]:
    """Clean one raw session; returns 0..n sessions (an empty utterance splits the session)."""
    return clean_sessions([list(turns)], options, counters)[0]
