"""Length-grouped batches and their collation: compute goes to real tokens, not padding.

A batch plan is a pure function of (lengths, budget, seed, epoch): resuming recomputes the plan and
skips to the saved position, so no sampler state has to be stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dialogpt_zh.data.store import StoreSplit
from dialogpt_zh.sequence import Layout

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips


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


def shard_batches(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """This process's share under data parallelism; every rank gets the same count (the rest is left over)."""
    if world_size <= 1:
        return batches
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T] padded with pad_id on the right
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    labels: torch.Tensor          # [B, T] IGNORE_INDEX where no loss is taken (padding, masked first turn)
    num_tokens: int               # real (non-padding) tokens
    num_targets: int              # tokens that are predicted (labels != IGNORE_INDEX after the shift)
    token_type_ids: Optional[torch.Tensor] = None   # [B, T] for a layout with token types (cdial), else None

    def to(self, device) -> "Batch":
        types = self.token_type_ids.to(device) if self.token_type_ids is not None else None
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.num_tokens, self.num_targets, types)


def collate(split: StoreSplit, indices, direction: str, pad_id: int, replies_only: bool = False,
            layout: Optional[Layout] = None) -> Batch:
    """Sequences of the given windows (in `direction`, built by `layout`; default the store's chitchat
    sequences), right-padded, with the loss mask in `labels`."""
    if layout is None:
        built = [(split.sequence(int(i), direction), None) for i in indices]
    else:
        built = [layout.sequence(split.turns(int(i)), direction) for i in indices]
    width = max(len(s) for s, _ in built)
    ids = torch.full((len(built), width), pad_id, dtype=torch.long)
    labels = torch.full((len(built), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(built), width), dtype=torch.long)
    types = torch.full((len(built), width), pad_id, dtype=torch.long) if built[0][1] is not None else None
    for row, (i, (seq, seq_types)) in enumerate(zip(indices, built)):
        t = torch.tensor(seq, dtype=torch.long)
        ids[row, :len(seq)] = t
        mask[row, :len(seq)] = 1
        labels[row, :len(seq)] = t
        if types is not None:
            types[row, :len(seq)] = torch.tensor(seq_types, dtype=torch.long)
        # Position 0 ([CLS]) is never a target; replies-only also drops the first turn and what ends it.
        if not replies_only:
            skip = 1
        elif layout is None:
            skip = split.first_turn_length(int(i), direction)
        else:
            skip = layout.first_turn_length(split.turns(int(i)), direction)
        labels[row, :skip] = IGNORE_INDEX
    num_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return Batch(ids, mask, labels, int(mask.sum()), num_targets, types)
