"""Batch plans over a store split and their collation: compute goes to real tokens, not padding.

Two layouts, one collation (`collate_rows`):
- padded (the default): windows of similar length share a batch, one window per row, right-padded;
- packed (`--pack N`): several windows end to end in rows of N tokens, each window attending only to itself
  (position ids restart at every window; transformers' GPT-2 turns that into a block-diagonal causal mask),
  so a batch has one fixed shape.

Either way no attention mask goes to the model: padding sits at the end of a row, a causal model never lets a
real token see what comes after it, and padding is never a target, so the loss is the same as with a mask.

A plan is a pure function of (lengths, budget, seed, epoch): resuming recomputes it and skips to the saved
position, so no sampler state has to be stored.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from dialogpt_zh.data.store import StoreSplit
from dialogpt_zh.sequence import Layout

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips

Rows = Sequence[Sequence[int]]  # a batch as rows of window indices (one window per row unless packed)


def plan_batches(lengths: np.ndarray, batch_tokens: int, batch_size: int, seed: int, epoch: int,
                 group_batches: int = 64) -> list[np.ndarray]:
    """Window indices per batch for one epoch.

    Shuffle all windows (seeded by seed and epoch), sort them by length within groups of about
    `group_batches` batches, cut each group into batches, and shuffle the batches. With `batch_size > 0`
    a batch holds that many windows; otherwise as many as fit in `batch_tokens` padded tokens
    (at least one). Windows of similar length share a batch, so padding is small.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    per_batch = batch_size if batch_size > 0 else max(1, batch_tokens // max(1, int(np.mean(lengths))))
    group = max(1, per_batch * group_batches)
    batches: list[np.ndarray] = []
    for g in range(0, n, group):
        idx = order[g:g + group]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        if batch_size > 0:
            batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
            continue
        start = 0
        lens = lengths[idx]
        for i in range(1, len(idx) + 1):
            # sorted ascending, so the padded size of idx[start:i+1] is (i+1-start) * lens[i]
            if i == len(idx) or (i + 1 - start) * int(lens[i]) > batch_tokens:
                batches.append(idx[start:i])
                start = i
    perm = rng.permutation(len(batches))
    return [batches[p] for p in perm]


def _best_fit_rows(idx: np.ndarray, lengths: np.ndarray, row_tokens: int) -> list[list[int]]:
    """Pack windows (longest first) into rows of `row_tokens`: each goes to the fullest row it still fits in."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for i in idx[np.argsort(-lengths[idx], kind="stable")]:
        need = int(lengths[i])
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([int(i)])
            bisect.insort(free, (row_tokens - need, len(rows) - 1))
            continue
        room, row = free.pop(k)
        rows[row].append(int(i))
        bisect.insort(free, (room - need, row))
    return rows


def plan_packed_batches(lengths: np.ndarray, row_tokens: int, batch_tokens: int, seed: int, epoch: int,
                        group_batches: int = 64) -> list[list[np.ndarray]]:
    """Rows of window indices per batch for one epoch, each row at most `row_tokens` long.

    Shuffle all windows (seeded by seed and epoch), pack each group of about `group_batches` batches' worth
    of tokens best-fit-decreasing into rows, shuffle the rows and cut them into batches of
    `batch_tokens // row_tokens` rows (at least one; the epoch's last batch may have fewer).
    Every window is in exactly one row; a window longer than `row_tokens` is refused by the caller.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    rows_per_batch = max(1, batch_tokens // row_tokens)
    cut = np.searchsorted(np.cumsum(lengths[order]), np.arange(1, n + 1) * rows_per_batch * group_batches * row_tokens)
    rows: list[list[int]] = []
    for idx in np.split(order, np.unique(cut[cut < n])):
        rows.extend(_best_fit_rows(idx, lengths, row_tokens))
    rows = [rows[p] for p in rng.permutation(len(rows))]
    return [[np.asarray(r, dtype=np.int64) for r in rows[i:i + rows_per_batch]]
            for i in range(0, len(rows), rows_per_batch)]


def shard_batches(batches: list, rank: int, world_size: int) -> list:
    """This process's share under data parallelism; every rank gets the same count (the rest is left over)."""
    if world_size <= 1:
        return batches
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


@dataclass
class Batch:
    input_ids: torch.Tensor       # [R, W] padded with pad_id on the right
    attention_mask: torch.Tensor  # [R, W] 1 for real tokens (for inspection; the model gets none, see above)
    labels: torch.Tensor          # [R, W] IGNORE_INDEX where no loss is taken (padding, [CLS], masked first turn)
    position_ids: Optional[torch.Tensor]  # [R, W] restarting at every window (packed); None: 0..W-1 per row
    target_index: torch.Tensor    # [N] flat positions in [R, W] whose next token is a target
    target_ids: torch.Tensor      # [N] those next tokens
    num_tokens: int               # real (non-padding) tokens
    num_targets: int              # tokens that are predicted (N)
    token_type_ids: Optional[torch.Tensor] = None  # [R, W] for a layout with token types (cdial), else None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.input_ids), self.attention_mask, self.labels, move(self.position_ids),
                     move(self.target_index), move(self.target_ids), self.num_tokens, self.num_targets,
                     move(self.token_type_ids))

    def pin_memory(self) -> "Batch":
        """A copy in page-locked memory, so that `to(cuda, non_blocking=True)` overlaps with compute."""
        def pin(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.pin_memory()

        return Batch(pin(self.input_ids), self.attention_mask, self.labels, pin(self.position_ids),
                     pin(self.target_index), pin(self.target_ids), self.num_tokens, self.num_targets,
                     pin(self.token_type_ids))


def _flat_ranges(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pieces of the given lengths laid end to end: each element's piece and its offset inside it."""
    piece = np.repeat(np.arange(len(lengths)), lengths)
    return piece, np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def window_sequences(split: StoreSplit, windows: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """The sequences of the given windows end to end (as `split.sequence` builds each one, vectorised), their
    lengths, and the length of each one's [CLS] + first turn + [SEP] (what --replies-only leaves out)."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be forward or backward, not {direction!r}")
    start, count = split.win[windows, 0], split.win[windows, 1]
    window_of_turn, turn = _flat_ranges(count)
    if direction == "backward":
        turn = count[window_of_turn] - 1 - turn
    utt = start[window_of_turn] + turn
    utt_len = split.utt[utt + 1] - split.utt[utt]
    seq_len = 1 + np.bincount(window_of_turn, weights=utt_len + 1, minlength=len(windows)).astype(np.int64)
    seq_start = np.cumsum(seq_len) - seq_len
    out = np.empty(int(seq_len.sum()), dtype=np.int64)
    out[seq_start] = split.cls_id
    piece_end = np.cumsum(utt_len + 1)  # each turn's end (after its [SEP]) inside its window, from [CLS] + 1
    before_window = np.repeat(np.concatenate([[0], piece_end])[np.cumsum(count) - count], count)
    turn_start = seq_start[window_of_turn] + 1 + piece_end - (utt_len + 1) - before_window
    out[turn_start + utt_len] = split.sep_id
    turn_of_token, offset = _flat_ranges(utt_len)
    out[turn_start[turn_of_token] + offset] = split.ids[split.utt[utt][turn_of_token] + offset]
    first = np.cumsum(count) - count  # the first turn in sequence order of every window
    return out, seq_len, utt_len[first] + 2


def layout_sequences(split: StoreSplit, windows: np.ndarray, direction: str, layout: Optional[Layout]
                     ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray]:
    """(ids end to end, their token types or None, lengths, first-turn lengths) of the given windows as
    `layout` builds them (dialogpt_zh.sequence; None or chitchat: the store's own format, vectorised)."""
    if layout is None or not layout.token_types:
        ids, seq_len, first_len = window_sequences(split, windows, direction)
        return ids, None, seq_len, first_len
    built = [(layout.sequence(turns, direction), layout.first_turn_length(turns, direction))
             for turns in (split.turns(int(w)) for w in windows)]
    ids = np.fromiter((t for (seq, _), _ in built for t in seq), dtype=np.int64)
    types = np.fromiter((t for (_, seq_types), _ in built for t in seq_types), dtype=np.int64)
    seq_len = np.array([len(seq) for (seq, _), _ in built], dtype=np.int64)
    return ids, types, seq_len, np.array([first for _, first in built], dtype=np.int64)


def collate_rows(split: StoreSplit, rows: Rows, direction: str, pad_id: int, replies_only: bool = False,
                 packed: bool = False, layout: Optional[Layout] = None) -> Batch:
    """Rows of windows (in `direction`) laid end to end and right-padded to the longest row, with the loss mask
    in `labels`: position 0 of every window ([CLS]) is never a target, so no window predicts the next one's
    tokens; --replies-only also drops each window's first turn and its [SEP]. `packed`: position ids restart
    at every window (and at the padding); otherwise each row must hold one window. `layout`: how windows
    become ids (and token types, padded with `pad_id`); None: the store's chitchat sequences."""
    windows = np.fromiter((w for row in rows for w in row), dtype=np.int64)
    per_row = np.array([len(row) for row in rows], dtype=np.int64)
    if not packed and (per_row != 1).any():
        raise ValueError("an unpacked batch holds one window per row")
    tokens, token_types, seq_len, first_len = layout_sequences(split, windows, direction, layout)
    row_of_window = np.repeat(np.arange(len(rows)), per_row)
    row_len = np.bincount(row_of_window, weights=seq_len, minlength=len(rows)).astype(np.int64)
    width = int(row_len.max())
    window_col = np.cumsum(seq_len) - seq_len - np.repeat((np.cumsum(row_len) - row_len), per_row)
    window_of_token, pos = _flat_ranges(seq_len)
    flat = row_of_window[window_of_token] * width + window_col[window_of_token] + pos
    ids = np.full(len(rows) * width, pad_id, dtype=np.int64)
    ids[flat] = tokens
    labels = np.full(len(rows) * width, IGNORE_INDEX, dtype=np.int64)
    skip = first_len if replies_only else np.ones_like(seq_len)
    target = pos >= skip[window_of_token]
    labels[flat[target]] = tokens[target]
    real = np.zeros(len(rows) * width, dtype=np.int64)
    real[flat] = 1
    types = None
    if token_types is not None:
        types = np.full(len(rows) * width, pad_id, dtype=np.int64)
        types[flat] = token_types
        types = torch.from_numpy(types.reshape(len(rows), width))
    positions = None
    if packed:
        # the padding at a row's end counts from 0 too, so it is a block of its own
        positions = (np.arange(width, dtype=np.int64)[None, :] - row_len[:, None]).reshape(-1)
        positions[flat] = pos
        positions = torch.from_numpy(positions.reshape(len(rows), width))
    # a position predicts the next one's label: the label of flat position i + 1, never across rows (the first
    # position of a row is [CLS] or padding, no target)
    target_index = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    return Batch(torch.from_numpy(ids.reshape(len(rows), width)), torch.from_numpy(real.reshape(len(rows), width)),
                 torch.from_numpy(labels.reshape(len(rows), width)), positions, torch.from_numpy(target_index),
                 torch.from_numpy(labels[target_index + 1]), int(real.sum()), int(len(target_index)), types)


def collate(split: StoreSplit, indices, direction: str, pad_id: int, replies_only: bool = False,
            layout: Optional[Layout] = None) -> Batch:
    """Sequences of the given windows (in `direction`, built by `layout`), one per row, right-padded, with the
    loss mask in `labels`."""
    return collate_rows(split, [[int(i)] for i in indices], direction, pad_id, replies_only, layout=layout)
