"""The one sequence format shared by the store, the trainer and the engine.

forward:  [CLS] u1 [SEP] u2 [SEP] ... un [SEP]      (learns P(reply | context))
backward: [CLS] un [SEP] u(n-1) [SEP] ... u1 [SEP]  (learns P(context | reply), the MMI scorer)
"""
from __future__ import annotations

from typing import Literal, Sequence

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[str, ...] = ("forward", "backward")


def build_sequence(turns: Sequence[Sequence[int]], direction: Direction, cls_id: int, sep_id: int) -> list[int]:
    """Token ids of a window of turns (given oldest first) in the given direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    ordered = turns if direction == "forward" else list(reversed(turns))
    ids = [cls_id]
    for turn in ordered:
        ids.extend(int(t) for t in turn)
        ids.append(sep_id)
    return ids


def first_turn_length(turns: Sequence[Sequence[int]], direction: Direction) -> int:
    """Tokens of [CLS] + the first turn in sequence order + its [SEP]: what "replies only" loss masks."""
    first = turns[0] if direction == "forward" else turns[-1]
    return len(first) + 2


def sequence_length(turn_lengths: Sequence[int]) -> int:
    """Length of a window in either direction: [CLS] + each turn + one [SEP] per turn."""
    return 1 + sum(turn_lengths) + len(turn_lengths)
