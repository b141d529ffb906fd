"""Readers of structured chat archives: JSON (`lccc-json`, `kdconv-json`, `chat-json`), JSON Lines
(`chat-jsonl`) and ChatterBot YAML (`chatterbot-yaml`); `dialogpt_zh.data.readers` is the public entry.

JSON streams one session at a time (a small incremental parser over `json.JSONDecoder.raw_decode`), so memory
does not grow with the file; YAML files are loaded whole (ChatterBot files are a few KB).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Iterator

from dialogpt_zh.data.corpus_files import (
    CorpusFile,
    RawSession,
    _decode_error,
    _iter_line_blocks,
    open_corpus_file,
)
from dialogpt_zh.errors import UserError

# chat messages that are not turns of the dialogue (counted, not read), and the speaker roles we know
# (any other role is still a turn, counted `message_role_unknown`)
CHAT_SYSTEM_ROLES = frozenset({"system", "developer"})
CHAT_TOOL_ROLES = frozenset({"tool", "function", "ipython", "observation"})
CHAT_SPEAKER_ROLES = frozenset({"user", "assistant", "human", "gpt", "bot", "model", "chatgpt", "client",
                                "counselor", "counsellor", "patient", "doctor", "speaker"})


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
