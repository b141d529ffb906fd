"""The sequence formats shared by the store, the trainer and the engine: THE place inputs are built.

Two input layouts, as data (`Layout`), so every model is fed the way it was trained:

chitchat (ours, GPT2-chitchat's, and any plain LM fine-tuned here), no token types:
    forward:  [CLS] u1 [SEP] u2 [SEP] ... un [SEP]      (learns P(reply | context))
    backward: [CLS] un [SEP] u(n-1) [SEP] ... u1 [SEP]  (learns P(context | reply), the MMI scorer)

cdial (thu-coai's CDial-GPT): a speaker token before each turn, alternating from [speaker1]; one [SEP] at
the end; token types: [CLS] for the [CLS], then each turn's speaker token for that turn (its speaker token
included) and for the final [SEP]:
    forward:  [CLS] [speaker1] u1 [speaker2] u2 ... [speakerX] un [SEP]
    backward: the same over the turns newest first ([speaker1] is then the reply's)

In both, "the first turn" of a sequence is everything up to the token that starts the next turn's text
(`first_turn_length`): the trainer's replies-only loss skips it, and a backward model's MMI score sums the
log-probs of the tokens after it (the context tokens only, never the reply's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[str, ...] = ("forward", "backward")
LAYOUTS: tuple[str, ...] = ("chitchat", "cdial")
SPEAKER_TOKENS: tuple[str, str] = ("[speaker1]", "[speaker2]")


def build_sequence(turns: Sequence[Sequence[int]], direction: Direction, cls_id: int, sep_id: int) -> list[int]:
    """Token ids of a window of turns (given oldest first) in the given direction (chitchat layout)."""
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


def infer_layout(vocab: Mapping[str, int]) -> str:
    """The layout a vocabulary was made for: cdial when it holds both speaker tokens, else chitchat."""
    return "cdial" if all(t in vocab for t in SPEAKER_TOKENS) else "chitchat"


@dataclass(frozen=True)
class Layout:
    """How turns become model inputs: ids (and, for cdial, token type ids). Build one with `for_tokenizer`."""

    name: str
    cls_id: int
    sep_id: int
    speaker_ids: Optional[tuple[int, int]] = None   # cdial: ([speaker1], [speaker2]) ids

    @classmethod
    def for_tokenizer(cls, name: str, tokenizer) -> "Layout":
        """The layout `name` over this tokenizer's ids; ValueError when its vocabulary cannot carry it."""
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}")
        speakers = None
        if name == "cdial":
            vocab = tokenizer.get_vocab()
            missing = [t for t in SPEAKER_TOKENS if t not in vocab]
            if missing:
                raise ValueError(f"the cdial layout needs the tokens {', '.join(missing)} in the vocabulary")
            speakers = (vocab[SPEAKER_TOKENS[0]], vocab[SPEAKER_TOKENS[1]])
        return cls(name, tokenizer.cls_token_id, tokenizer.sep_token_id, speakers)

    @property
    def token_types(self) -> bool:
        """Whether the model reads token type ids besides the ids."""
        return self.speaker_ids is not None

    @property
    def extra_tokens(self) -> int:
        """Tokens of a sequence besides the turns' own and one per turn: [CLS] (+ the final [SEP] for cdial)."""
        return 2 if self.token_types else 1

    @property
    def special_ids(self) -> list[int]:
        """The ids only the layout places (never sampled inside a reply, except [SEP] which ends it)."""
        return [self.cls_id, self.sep_id, *(self.speaker_ids or ())]

    def sequence_length(self, turn_lengths: Sequence[int]) -> int:
        return self.extra_tokens + sum(turn_lengths) + len(turn_lengths)

    def _ordered(self, turns: Sequence[Sequence[int]], direction: Direction) -> Sequence[Sequence[int]]:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        return turns if direction == "forward" else list(reversed(turns))

    def sequence(self, turns: Sequence[Sequence[int]], direction: Direction) -> tuple[list[int], Optional[list[int]]]:
        """(ids, token types or None) of a window of turns (oldest first) read in `direction`."""
        if not self.token_types:
            return build_sequence(turns, direction, self.cls_id, self.sep_id), None
        ids, types = self._speaker_turns(self._ordered(turns, direction))
        ids.append(self.sep_id)
        types.append(types[-1])   # the [SEP] belongs to the last turn's segment
        return ids, types

    def _speaker_turns(self, ordered: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        assert self.speaker_ids is not None
        ids, types = [self.cls_id], [self.cls_id]
        for k, turn in enumerate(ordered):
            speaker = self.speaker_ids[k % 2]
            ids.append(speaker)
            ids.extend(int(t) for t in turn)
            types.extend([speaker] * (len(turn) + 1))
        return ids, types

    def prompt(self, context: Sequence[Sequence[int]]) -> tuple[list[int], Optional[list[int]], Optional[int]]:
        """What a forward model reads before the reply's first token: (ids, types or None, the token type
        of the reply's tokens or None). The reply then ends with [SEP]."""
        if not self.token_types:
            return build_sequence(context, "forward", self.cls_id, self.sep_id), None, None
        assert self.speaker_ids is not None
        ids, types = self._speaker_turns(context)
        reply_speaker = self.speaker_ids[len(context) % 2]
        ids.append(reply_speaker)
        types.append(reply_speaker)
        return ids, types, reply_speaker

    def first_turn_length(self, turns: Sequence[Sequence[int]], direction: Direction) -> int:
        """Tokens up to where the second turn's text starts (or the whole sequence for one turn): chitchat
        [CLS] t1 [SEP]; cdial [CLS] [speaker1] t1 [speaker2] (one turn: [CLS] [speaker1] t1 [SEP])."""
        first = self._ordered(turns, direction)[0]
        return len(first) + (3 if self.token_types else 2)
