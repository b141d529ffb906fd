"""The token store: what the preprocessor writes and the trainer reads.

A store directory holds, for each split S (train / valid / test):
  S.ids.bin   token ids of every utterance, concatenated, no special tokens (uint16, or uint32 for
              vocabularies over 65,535), little-endian, memory-mapped when read;
  S.utt.npy   int64 [n_utterances + 1]: utterance i is ids[utt[i]:utt[i+1]];
  S.win.npy   int64 [n_windows, 2]: (first utterance, number of utterances) of each window of
              consecutive turns. Utterances are stored once; windows may share them.
plus `tokenizer/` (a Hugging Face tokenizer directory) and `manifest.json`.
A window serves both directions: `dialogpt_zh.sequence.build_sequence` adds [CLS]/[SEP] and the order.
"""
from __future__ import annotations

import json
import math
import re
from array import array
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dialogpt_zh.data.cleaning import MAX_REPEAT
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import loads_json
from dialogpt_zh.sequence import DIRECTIONS, Direction, build_sequence, first_turn_length

STORE_FORMAT = "dialogpt_zh.token_store"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before the per-window sources
MAX_SOURCES = 65535  # S.src.npy is uint16
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPECIAL_NAMES = ("pad", "cls", "sep", "unk")  # the manifest's special_ids


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class SplitWriter:
    """Appends sessions of one split to S.ids.bin while keeping the (small) offset tables in memory."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, with_sources: bool = False) -> None:
        self.split = split
        self.dtype = dtype
        self._ids = open(directory / f"{split}.ids.bin", "wb")
        self._utt = array("q", [0])
        self._win = array("q")
        self._src = array("H") if with_sources else None
        self.num_tokens = 0

    def _add_sources(self, sources, n: int) -> None:
        if self._src is None:
            if sources is not None:
                raise ValueError("this store was opened without source names: pass sources= to StoreWriter")
            return
        if sources is None:
            raise ValueError("this store records each window's source: give the windows' source")
        src = np.broadcast_to(np.asarray(sources, dtype=np.int64), (n,))
        if n and (src.min() < 0 or src.max() > MAX_SOURCES):
            raise ValueError(f"source index outside 0..{MAX_SOURCES}")
        self._src.frombytes(src.astype("<u2").tobytes())

    def add_session(self, utterances: Sequence[Sequence[int]], windows: Sequence[tuple[int, int]],
                    source: int | None = None) -> None:
        """Append a session's utterances (token ids) and its windows as (start, count) within the session;
        `source`: the session's source index (required when the writer records sources)."""
        self._add_sources(source, len(windows))
        base = len(self._utt) - 1
        for utt in utterances:
            arr = np.asarray(utt, dtype=self.dtype)
            self._ids.write(arr.tobytes())
            self.num_tokens += len(arr)
            self._utt.append(self.num_tokens)
        for start, count in windows:
            if count < 1 or start < 0 or start + count > len(utterances):
                raise ValueError(f"window ({start}, {count}) outside a session of {len(utterances)} turns")
            self._win.extend((base + start, count))

    def add_sessions(self, ids: np.ndarray, utterance_lengths: np.ndarray, windows: np.ndarray,
                     sources: np.ndarray | None = None) -> None:
        """Bulk `add_session`: utterances as concatenated ids + their lengths, windows as rows (first
        utterance, count) counted from the first utterance given here, `sources` one per window. Same bytes
        as one call per session."""
        base = len(self._utt) - 1
        n = len(utterance_lengths)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
        if len(windows) and ((windows[:, 1] < 1).any() or (windows[:, 0] < 0).any()
                             or (windows.sum(axis=1) > n).any()):
            raise ValueError(f"a window lies outside the {n} utterances given")
        if sources is not None and len(np.asarray(sources)) != len(windows):
            raise ValueError(f"{len(np.asarray(sources))} sources for {len(windows)} windows")
        self._add_sources(sources, len(windows))
        self._ids.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        ends = self.num_tokens + np.cumsum(utterance_lengths, dtype=np.int64)
        self._utt.frombytes(ends.tobytes())
        self.num_tokens = int(ends[-1]) if n else self.num_tokens
        self._win.frombytes((windows + np.array([base, 0], dtype=np.int64)).tobytes())

    @property
    def num_utterances(self) -> int:
        return len(self._utt) - 1

    @property
    def num_windows(self) -> int:
        return len(self._win) // 2

    def close(self, directory: Path) -> None:
        self._ids.close()
        np.save(directory / f"{self.split}.utt.npy", np.frombuffer(self._utt, dtype=np.int64))
        np.save(directory / f"{self.split}.win.npy",
                np.frombuffer(self._win, dtype=np.int64).reshape(-1, 2) if self._win else np.zeros((0, 2), np.int64))
        if self._src is not None:
            np.save(directory / f"{self.split}.src.npy",
                    np.frombuffer(self._src, dtype="<u2") if self._src else np.zeros(0, "<u2"))


class StoreWriter:
    """Writes a store into `directory` (use a temp dir from `fsutil.atomic_directory`, then it is renamed)."""

    def __init__(self, directory: str | Path, tokenizer, splits: Sequence[str] = ("train", "valid", "test"),
                 sources: Sequence[str] | None = None) -> None:
        """`sources`: the source (input) names; given, every window is written with its source index
        (S.src.npy) and the manifest lists the names."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.dtype = ids_dtype(len(tokenizer))
        if sources is not None and len(sources) > MAX_SOURCES + 1:
            raise ValueError(f"at most {MAX_SOURCES + 1} sources")
        self.sources = list(sources) if sources is not None else None
        self.splits = {s: SplitWriter(self.directory, s, self.dtype, sources is not None) for s in splits}

    def add_session(self, split: str, utterances: Sequence[Sequence[int]],
                    windows: Sequence[tuple[int, int]], source: int | None = None) -> None:
        self.splits[split].add_session(utterances, windows, source)

    def add_sessions(self, split: str, ids: np.ndarray, utterance_lengths: np.ndarray, windows: np.ndarray,
                     sources: np.ndarray | None = None) -> None:
        self.splits[split].add_sessions(ids, utterance_lengths, windows, sources)

    def close(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish the files, save the tokenizer and write manifest.json (extra keys come from `manifest`)."""
        counts = {}
        for name, w in self.splits.items():
            w.close(self.directory)
            counts[name] = {"windows": w.num_windows, "utterances": w.num_utterances, "tokens": w.num_tokens}
        self.tokenizer.save_pretrained(str(self.directory / TOKENIZER_DIR))
        full = {"format": STORE_FORMAT, "version": STORE_VERSION, "dtype": self.dtype.str,
                "vocab_size": len(self.tokenizer), "directions": list(DIRECTIONS),
                "special_ids": {"pad": self.tokenizer.pad_token_id, "cls": self.tokenizer.cls_token_id,
                                "sep": self.tokenizer.sep_token_id, "unk": self.tokenizer.unk_token_id},
                "store_splits": counts, **({"sources": self.sources} if self.sources is not None else {}),
                **manifest}
        (self.directory / MANIFEST).write_text(json.dumps(full, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
        return full


class StoreSplit:
    """Read access to one split: windows as token sequences in either direction.

    Checked when opened (a truncated or foreign file is a UserError naming it, never windows of garbage):
    S.ids.bin holds exactly the manifest's token count, S.utt.npy is int64 [utterances + 1] rising from 0
    to that count, S.win.npy is int64 [windows, 2] of windows inside the utterances, and every token id is
    below the vocabulary size.
    """

    def __init__(self, store: "TokenStore", split: str) -> None:
        d = store.path
        self.name = split
        self.cls_id, self.sep_id = store.cls_id, store.sep_id
        counts = store.manifest["store_splits"][split]
        dtype = np.dtype(store.manifest["dtype"])
        ids_path = d / f"{split}.ids.bin"
        _require_file(ids_path)
        size = ids_path.stat().st_size
        if size != counts["tokens"] * dtype.itemsize:
            raise UserError(f"{size:,d} bytes where the manifest's {counts['tokens']:,d} {dtype.name} tokens take "
                            f"{counts['tokens'] * dtype.itemsize:,d} (truncated or from another store); "
                            f"re-run the preprocessor", path=ids_path)
        try:
            self.ids = np.memmap(ids_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        except OSError as e:  # no read permission, or a file that cannot be mapped
            raise UserError(f"cannot read: {e.strerror or e}", path=ids_path) from e
        if size and int(self.ids.max()) >= store.manifest["vocab_size"]:
            raise UserError(f"token id {int(self.ids.max())} is outside the vocabulary "
                            f"({store.manifest['vocab_size']} tokens)", path=ids_path)
        self.utt = _load_table(d / f"{split}.utt.npy", (counts["utterances"] + 1,))
        if self.utt[0] != 0 or self.utt[-1] != counts["tokens"] or (np.diff(self.utt) < 0).any():
            raise UserError(f"utterance offsets must rise from 0 to the {counts['tokens']} tokens",
                            path=d / f"{split}.utt.npy")
        self.win = _load_table(d / f"{split}.win.npy", (counts["windows"], 2))
        # start > utterances - count, not start + count > utterances: the sum of two huge int64s wraps
        # negative and would pass
        if len(self.win) and ((self.win[:, 1] < 1).any() or (self.win[:, 0] < 0).any()
                              or (self.win[:, 0] > counts["utterances"] - self.win[:, 1]).any()):
            raise UserError(f"a window lies outside the {counts['utterances']} utterances",
                            path=d / f"{split}.win.npy")
        self.src: np.ndarray | None = None
        self._manifest_path = d / MANIFEST
        if store.sources is not None:
            src_path = d / f"{split}.src.npy"
            self.src = _load_table(src_path, (counts["windows"],), np.dtype("<u2"))
            if len(self.src) and int(self.src.max()) >= len(store.sources):
                raise UserError(f"source index {int(self.src.max())} but the manifest names {len(store.sources)} "
                                f"sources", path=src_path)

    def window_sources(self) -> np.ndarray:
        """The source index (into `TokenStore.sources`) of every window; stores made before version 2 do
        not record it: a UserError says to re-run the preprocessor."""
        if self.src is None:
            raise UserError("this token store does not record which source each window comes from (it was "
                            "made before store version 2); re-run `python -m dialogpt_zh.preprocess` to "
                            "rebuild it", path=self._manifest_path, field="sources")
        return self.src

    def __len__(self) -> int:
        return len(self.win)

    def turns(self, i: int) -> list[np.ndarray]:
        """The utterances (token ids, oldest first) of window `i`."""
        start, count = self.win[i]
        return [self.ids[self.utt[u]:self.utt[u + 1]] for u in range(start, start + count)]

    def sequence(self, i: int, direction: Direction) -> list[int]:
        return build_sequence(self.turns(i), direction, self.cls_id, self.sep_id)

    def first_turn_length(self, i: int, direction: Direction) -> int:
        return first_turn_length(self.turns(i), direction)

    def lengths(self, extra_tokens: int = 1) -> np.ndarray:
        """Sequence length of every window (the same in both directions), for length-grouped batching:
        its turns, one [SEP] (or speaker token) per turn and `extra_tokens` more (the layout's
        `Layout.extra_tokens`: 1 for [CLS])."""
        utt_len = np.diff(self.utt)
        csum = np.concatenate([[0], np.cumsum(utt_len)])
        start, count = self.win[:, 0], self.win[:, 1]
        return extra_tokens + (csum[start + count] - csum[start]) + count

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for i in range(len(self)):
            yield self.turns(i)


INT64 = np.dtype(np.int64)


def _require_file(path: Path) -> None:
    """A store file must be a regular file: "missing" would mislead for a directory in its place."""
    if not path.is_file():
        raise UserError("expected a file, found a directory" if path.is_dir() else "missing store file", path=path)


def _load_table(path: Path, shape: tuple[int, ...], dtype: np.dtype = INT64) -> np.ndarray:
    """A .npy table of the given shape and dtype (default int64; allow_pickle=False: never unpickle anything
    from a user path). The header and the file's size are checked before the data is read: a header claiming
    a huge array must not make numpy allocate it."""
    _require_file(path)
    try:
        with open(path, "rb") as f:
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError("unsupported .npy format version")
            found_shape, _, found_dtype = read_header(f)
            if found_dtype != dtype or found_shape != shape:
                raise UserError(f"expected {dtype.name} {list(shape)}, found {found_dtype} {list(found_shape)} "
                                f"(truncated or from another store); re-run the preprocessor", path=path)
            data, need = path.stat().st_size - f.tell(), math.prod(shape) * dtype.itemsize
            if data != need:
                raise ValueError(f"{data:,d} bytes of data where {list(shape)} {dtype.name} take {need:,d}")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"unreadable .npy file ({e}); re-run the preprocessor", path=path) from e


# the .npy versions np.save writes (3.0 only for non-Latin-1 field names: never a store table)
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


# manifest fields the reader relies on, with their types
_MANIFEST_TYPES = {"dtype": str, "vocab_size": int, "special_ids": dict, "store_splits": dict}


def _check_manifest(m: Any, path: Path) -> None:
    if not isinstance(m, dict):
        raise UserError("manifest is not a JSON object", path=path)
    for key, kind in _MANIFEST_TYPES.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise UserError(f"expected {kind.__name__}, found {type(m.get(key)).__name__}", path=path, field=key)
    if m["dtype"] not in ("<u2", "<u4") or np.dtype(m["dtype"]) != ids_dtype(m["vocab_size"]):
        raise UserError(f"dtype {m['dtype']!r} does not fit vocab_size {m['vocab_size']} "
                        f"(expected {ids_dtype(m['vocab_size']).str!r})", path=path, field="dtype")
    for name in SPECIAL_NAMES:
        i = m["special_ids"].get(name)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < m["vocab_size"]:
            raise UserError(f"expected a token id below {m['vocab_size']}, found {i!r}", path=path,
                            field=f"special_ids.{name}")
    directions = m.get("directions", list(DIRECTIONS))
    if not isinstance(directions, list) or not directions or not all(d in DIRECTIONS for d in directions):
        raise UserError(f"expected a list of {list(DIRECTIONS)}, found {directions!r}", path=path,
                        field="directions")
    sources = m.get("sources")
    if sources is not None and (not isinstance(sources, list) or not all(isinstance(x, str) for x in sources)
                                or len(sources) > MAX_SOURCES + 1):
        raise UserError(f"expected a list of source names, found {sources!r}", path=path, field="sources")
    # optional fields that readers use: the index's card names corpora by "source" and normalises its
    # blocklist with the store's config (a wrong type there was a traceback, or a silently different cleaning)
    corpora = m.get("corpora", [])
    if not isinstance(corpora, list) or not all(isinstance(c, dict) and isinstance(c.get("source", ""), str)
                                                for c in corpora):
        raise UserError("expected a list of objects, each 'source' a string", path=path, field="corpora")
    config = m.get("config", {})
    if not isinstance(config, dict):
        raise UserError(f"expected an object, found {type(config).__name__}", path=path, field="config")
    repeat = config.get("max_repeat", 4)
    if type(repeat) is not int or not 1 <= repeat <= MAX_REPEAT:
        raise UserError(f"expected an int from 1 to {MAX_REPEAT}, found {repeat!r}", path=path,
                        field="config.max_repeat")
    if type(config.get("mask_pii", True)) is not bool:
        raise UserError(f"expected true or false, found {config['mask_pii']!r}", path=path, field="config.mask_pii")
    for split, counts in m["store_splits"].items():
        # a split name becomes a file name (S.ids.bin): "../x" would read files outside the store
        if not re.fullmatch(r"[\w-]+", split):
            raise UserError(f"split name {split!r} is not a plain name (letters, digits, _ and -)", path=path,
                            field="store_splits")
        for key in ("windows", "utterances", "tokens"):
            v = counts.get(key) if isinstance(counts, dict) else None
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"expected a count (int >= 0), found {v!r}", path=path,
                                field=f"store_splits.{split}.{key}")


class TokenStore:
    """A store directory written by `dialogpt_zh.preprocess`; every split is checked when it is opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise UserError("expected a token store directory, found a file" if self.path.exists()
                            else "data directory not found", path=self.path)
        if mpath.is_dir():
            raise UserError("expected a file, found a directory", path=mpath)
        if not mpath.is_file():
            raise UserError("not a token store (no manifest.json); make one with `python -m dialogpt_zh.preprocess`",
                            path=self.path)
        try:
            # loads_json: JSON nested too deeply is bad JSON here too, not a RecursionError
            self.manifest: dict[str, Any] = loads_json(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"unreadable manifest: {e.msg}", path=mpath, line=e.lineno) from e
        except UnicodeDecodeError as e:
            raise UserError(f"manifest is not UTF-8 text ({e.reason} at byte {e.start})", path=mpath) from e
        except OSError as e:  # no read permission, an I/O error
            raise UserError(f"cannot read the manifest: {e.strerror or e}", path=mpath) from e
        if not isinstance(self.manifest, dict):
            raise UserError("manifest is not a JSON object", path=mpath)
        if self.manifest.get("format") != STORE_FORMAT:
            raise UserError(f"not a dialogpt_zh token store (format={self.manifest.get('format')!r})", path=mpath,
                            field="format")
        version = self.manifest.get("version")
        # type(): `true` and 1.0 compare equal to 1 but are no version this code wrote
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise UserError(f"store version {self.manifest.get('version')!r} is not supported (this code reads "
                            f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-run the preprocessor",
                            path=mpath, field="version")
        _check_manifest(self.manifest, mpath)
        special = self.manifest["special_ids"]
        self.cls_id, self.sep_id, self.pad_id = special["cls"], special["sep"], special["pad"]
        # open (and so check) every split now: a damaged store fails here, not in the middle of a run
        self._splits: dict[str, StoreSplit] = {name: StoreSplit(self, name) for name in self.split_names()}

    @property
    def sources(self) -> list[str] | None:
        """Source (input) names, indexed by `StoreSplit.window_sources`; None for a version 1 store."""
        return self.manifest.get("sources")

    @property
    def directions(self) -> list[str]:
        return list(self.manifest.get("directions", DIRECTIONS))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def tokenizer(self):
        """The store's tokenizer, checked against the manifest: the stored ids and the manifest's special ids
        only mean its tokens when the sizes and special ids agree (a swapped tokenizer/ is refused here, for
        every reader, not trained on or indexed)."""
        from dialogpt_zh.tokenizer import load_tokenizer

        tok = load_tokenizer(self.tokenizer_path)
        mpath = self.path / MANIFEST
        if len(tok) != self.manifest["vocab_size"]:
            raise UserError(f"the tokenizer in {self.tokenizer_path} has {len(tok)} tokens but the manifest says "
                            f"{self.manifest['vocab_size']}", path=mpath, field="vocab_size")
        for name in SPECIAL_NAMES:
            ours, theirs = self.manifest["special_ids"][name], getattr(tok, f"{name}_token_id")
            if ours != theirs:
                raise UserError(f"the manifest says {ours} but the tokenizer in {self.tokenizer_path} has {theirs}",
                                path=mpath, field=f"special_ids.{name}")
        return tok

    def split_names(self) -> list[str]:
        return list(self.manifest.get("store_splits", {}))

    def split(self, name: str) -> StoreSplit:
        if name not in self.manifest.get("store_splits", {}):
            raise UserError(f"store has no split {name!r} (has {self.split_names()})", path=self.path)
        if name not in self._splits:
            self._splits[name] = StoreSplit(self, name)
        return self._splits[name]

    def nonempty_split(self, name: str) -> StoreSplit:
        """`split(name)`, refused when it has no window (what trains or indexes needs one)."""
        split = self.split(name)
        if len(split) == 0:
            raise UserError(f"the {name} split is empty (0 windows)", path=self.path / MANIFEST, field="store_splits")
        return split
