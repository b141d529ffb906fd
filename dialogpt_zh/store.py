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
from array import array
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dialogpt_zh.errors import UserError
from dialogpt_zh.sequence import DIRECTIONS, Direction, build_sequence, first_turn_length

STORE_FORMAT = "dialogpt_zh.token_store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class SplitWriter:
    """Appends sessions of one split to S.ids.bin while keeping the (small) offset tables in memory."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.split = split
        self.dtype = dtype
        self._ids = open(directory / f"{split}.ids.bin", "wb")
        self._utt = array("q", [0])
        self._win = array("q")
        self.num_tokens = 0

    def add_session(self, utterances: Sequence[Sequence[int]], windows: Sequence[tuple[int, int]]) -> None:
        """Append a session's utterances (token ids) and its windows as (start, count) within the session."""
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

    def add_sessions(self, ids: np.ndarray, utterance_lengths: np.ndarray, windows: np.ndarray) -> None:
        """Bulk `add_session`: utterances as concatenated ids + their lengths, windows as rows (first
        utterance, count) counted from the first utterance given here. Same bytes as one call per session."""
        base = len(self._utt) - 1
        n = len(utterance_lengths)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
        if len(windows) and ((windows[:, 1] < 1).any() or (windows[:, 0] < 0).any()
                             or (windows.sum(axis=1) > n).any()):
            raise ValueError(f"a window lies outside the {n} utterances given")
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


class StoreWriter:
    """Writes a store into `directory` (use a temp dir from `fsutil.atomic_directory`, then it is renamed)."""

    def __init__(self, directory: str | Path, tokenizer, splits: Sequence[str] = ("train", "valid", "test")) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.dtype = ids_dtype(len(tokenizer))
        self.splits = {s: SplitWriter(self.directory, s, self.dtype) for s in splits}

    def add_session(self, split: str, utterances: Sequence[Sequence[int]],
                    windows: Sequence[tuple[int, int]]) -> None:
        self.splits[split].add_session(utterances, windows)

    def add_sessions(self, split: str, ids: np.ndarray, utterance_lengths: np.ndarray, windows: np.ndarray) -> None:
        self.splits[split].add_sessions(ids, utterance_lengths, windows)

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
                "store_splits": counts, **manifest}
        (self.directory / MANIFEST).write_text(json.dumps(full, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
        return full


class StoreSplit:
    """Read access to one split: windows as token sequences in either direction."""

    def __init__(self, store: "TokenStore", split: str) -> None:
        d = store.path
        self.name = split
        self.cls_id, self.sep_id = store.cls_id, store.sep_id
        ids_path = d / f"{split}.ids.bin"
        dtype = np.dtype(store.manifest["dtype"])
        self.ids = (np.memmap(ids_path, dtype=dtype, mode="r") if ids_path.stat().st_size
                    else np.zeros(0, dtype=dtype))
        # allow_pickle=False: never unpickle anything from a user path.
        self.utt = np.load(d / f"{split}.utt.npy", allow_pickle=False)
        self.win = np.load(d / f"{split}.win.npy", allow_pickle=False).reshape(-1, 2)

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

    def lengths(self) -> np.ndarray:
        """Sequence length of every window (the same in both directions), for length-grouped batching."""
        utt_len = np.diff(self.utt)
        csum = np.concatenate([[0], np.cumsum(utt_len)])
        start, count = self.win[:, 0], self.win[:, 1]
        return 1 + (csum[start + count] - csum[start]) + count

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for i in range(len(self)):
            yield self.turns(i)


class TokenStore:
    """A store directory written by `dialogpt_zh.preprocess`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise UserError("data directory not found", path=self.path)
        if not mpath.is_file():
            raise UserError("not a token store (no manifest.json); make one with `python -m dialogpt_zh.preprocess`",
                            path=self.path)
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"unreadable manifest: {e.msg}", path=mpath, line=e.lineno) from e
        if self.manifest.get("format") != STORE_FORMAT:
            raise UserError(f"not a dialogpt_zh token store (format={self.manifest.get('format')!r})", path=mpath,
                            field="format")
        if self.manifest.get("version") != STORE_VERSION:
            raise UserError(f"store version {self.manifest.get('version')} is not supported "
                            f"(expected {STORE_VERSION}); re-run the preprocessor", path=mpath, field="version")
        special = self.manifest["special_ids"]
        self.cls_id, self.sep_id, self.pad_id = special["cls"], special["sep"], special["pad"]
        self._splits: dict[str, StoreSplit] = {}

    @property
    def directions(self) -> list[str]:
        return list(self.manifest.get("directions", DIRECTIONS))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def tokenizer(self):
        from dialogpt_zh.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def split_names(self) -> list[str]:
        return list(self.manifest.get("store_splits", {}))

    def split(self, name: str) -> StoreSplit:
        if name not in self.manifest.get("store_splits", {}):
            raise UserError(f"store has no split {name!r} (has {self.split_names()})", path=self.path)
        if name not in self._splits:
            self._splits[name] = StoreSplit(self, name)
        return self._splits[name]
