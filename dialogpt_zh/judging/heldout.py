"""Held-out data shared by evaluate and the arena: which splits count as held out, and per-case seeds."""

from __future__ import annotations

import numpy as np


def split_wanted(split: str | None, spec: str) -> bool:
    if spec == "all":
        return True
    if spec == "auto":
        return split != "train"
    return split in {s.strip() for s in spec.split(",")}


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index`: independent of which other cases or decoders run."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])
