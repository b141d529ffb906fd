"""The bot's settings, validated once, and THE ranking score: pure Python + numpy (no torch, no model).

Every face (interact, web page, evaluate, benchmarks) builds its flags from these dataclasses (one name per
setting everywhere) and hands the objects to the engine; a per-call change is `dataclasses.replace`, which
runs the same validation. Each numeric setting has real bounds (`BOUNDS`): the largest values are what a
small CPU bot can serve without exhausting memory (docs/engine.md, "Figures behind the code"), not taste.
The web page's sliders offer a sub-range of these (`PAGE_RANGES`), so no web client can ask for more.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dialogpt_zh.errors import UserError
from dialogpt_zh.sequence import LAYOUTS


def field_help(text: str, **kw: Any) -> dict:
    """Metadata for a dataclass field: `x: int = field(default=3, metadata=field_help("..."))`."""
    return {"help": text, **kw}


class SettingsError(UserError, ValueError):
    """An out-of-range or wrongly typed setting; names the field (exit 2 in a CLI, ValueError in Python)."""


# fields whose minimum itself is refused too (a later check says so): their range is printed as (min, max]
OPEN_BELOW = frozenset({"top_p"})
# (minimum, maximum), both inclusive. Lengths are tokens; a model's own position limit cuts further.
BOUNDS: dict[str, tuple[float, float]] = {
    "num_candidates": (-1, 256),     # -1 = auto; 0 is refused
    "top_k": (0, 100_000),
    "top_p": (0.0, 1.0),             # 0 itself is refused: (0, 1]
    "temperature": (0.0, 100.0),     # 0 = greedy
    "repetition_penalty": (0.01, 100.0),
    "no_repeat_ngram_size": (0, 1024),
    "min_length": (0, 1024),
    "max_length": (1, 1024),
    "max_history": (1, 1000),
    "max_context_tokens": (2, 8192),
    "retrieval_candidates": (-1, 256),
    "forward_weight": (-1000.0, 1000.0),
    "backward_weight": (-1000.0, 1000.0),
    "length_weight": (-1000.0, 1000.0),
    "retrieved_bonus": (-1000.0, 1000.0),
    "backward_context_turns": (0, 1000),
}

# The web page's sliders: (minimum, maximum, step), each inside BOUNDS (tests/test_settings.py checks it).
# A shared page keeps N and the history small; Gradio refuses API values outside a slider's range.
PAGE_RANGES: dict[str, tuple[float, float, float]] = {
    "num_candidates": (1, 30, 1),
    "top_k": (0, 100, 1),
    "top_p": (0.05, 1.0, 0.05),
    "temperature": (0.1, 2.0, 0.05),
    "repetition_penalty": (1.0, 2.0, 0.05),
    "backward_weight": (0.0, 2.0, 0.05),
    "max_history": (1, 20, 1),
}


# retrieval_candidates -1 (auto, the default) means this many for a bot with a retrieval index, 0 without one
AUTO_RETRIEVAL_CANDIDATES = 10
# num_candidates -1 (auto, the default): sampled candidates per turn alone, and beside retrieved ones. With an
# index most chosen replies are retrieved ones, so fewer samples keep the reply's cost near generation-only
# at the same judged quality (docs/retrieval.md, "How many sampled candidates beside the retrieved ones").
AUTO_NUM_CANDIDATES = 10
AUTO_NUM_CANDIDATES_WITH_RETRIEVAL = 5


@dataclass
class GenerationSettings:
    """How candidates are sampled and how much history the model sees."""

    num_candidates: int = field(default=-1, metadata=field_help(
        "candidate replies sampled per turn (one batch); the MMI reranker picks one (1..256); -1 = auto: "
        f"{AUTO_NUM_CANDIDATES}, or {AUTO_NUM_CANDIDATES_WITH_RETRIEVAL} when retrieved replies join them"))
    top_k: int = field(default=8, metadata=field_help("sample among the k most likely tokens (0 = off)"))
    top_p: float = field(default=1.0, metadata=field_help("nucleus sampling threshold in (0, 1] (1.0 = off)"))
    temperature: float = field(default=1.0, metadata=field_help(
        "softmax temperature (0..100); 0 = greedy (all candidates identical, so use with num_candidates 1)"))
    repetition_penalty: float = field(default=1.2, metadata=field_help(
        "penalty (>=1) on tokens already in the reply being generated (1.0 = off)"))
    no_repeat_ngram_size: int = field(default=4, metadata=field_help(
        "never repeat an n-gram of this size within a reply (0 = off)"))
    min_length: int = field(default=1, metadata=field_help("minimum reply length in tokens before [SEP] is allowed"))
    max_length: int = field(default=25, metadata=field_help(
        "maximum reply length in tokens (longer ones are cut; 1..1024)"))
    max_history: int = field(default=3, metadata=field_help(
        "most recent utterances (the user's latest included) the model sees; older ones are dropped"))
    max_context_tokens: int = field(default=200, metadata=field_help(
        "token budget of the context; oldest turns are dropped first to fit (also capped by the model size)"))
    retrieval_candidates: int = field(default=-1, metadata=field_help(
        "human replies retrieved from the bot's index (BOT_DIR/retrieval, python -m dialogpt_zh.index) and ranked "
        "with the sampled candidates by the same MMI score; 0 = off, -1 = auto: "
        f"{AUTO_RETRIEVAL_CANDIDATES} when the bot has an index, else 0 (-1..256; docs/retrieval.md)"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_number(self, f.name, f.type)
        if self.num_candidates == 0:
            raise SettingsError("must be -1 (auto) or in [1, 256], got 0", field="num_candidates")
        if self.top_p <= 0.0:
            raise SettingsError(f"must be in (0, 1], got {self.top_p!r}", field="top_p")
        if self.max_length < self.min_length:
            raise SettingsError(f"must be >= min_length ({self.min_length}), got {self.max_length}",
                                field="max_length")


@dataclass
class MMISettings:
    """How candidates are ranked.

    Defaults chosen on held-out data, by people as well as metrics, for the default models of this release
    (docs/evaluation.md, "Choosing the MMI weights", has the figures and their commands): the backward term
    alone (forward_weight 0) selected best, gave the fewest bland replies and won the blind pairs; the
    backward model scores only the user's latest turn (backward_context_turns 1), not every turn the
    forward model sees, which selected better on multi-turn contexts and costs less.
    """

    use_mmi: bool = field(default=True, metadata=field_help(
        "rerank with the backward model when there is one (--no_use_mmi: rank by the forward score only)"))
    forward_weight: float = field(default=0.0, metadata=field_help("weight of log P(reply | context)"))
    backward_weight: float = field(default=1.0, metadata=field_help(
        "weight of log P(context | reply), the MMI term (context tokens only)"))
    length_weight: float = field(default=0.0, metadata=field_help("weight per reply token (>0 favours longer replies)"))
    backward_context_turns: int = field(default=1, metadata=field_help(
        "context turns the backward model scores, most recent first (1 = only the user's latest; 0 = every "
        "turn the forward model sees): fewer turns make MMI cheaper"))
    retrieved_bonus: float = field(default=0.1, metadata=field_help(
        "added to the score of a reply retrieved from the bot's index (in the score's units: per-token log-prob "
        "with normalize=mean); 0 ranks retrieved and sampled replies alike (docs/retrieval.md: how 0.1 was chosen)"))
    normalize: Literal["mean", "sum"] = field(default="mean", metadata=field_help(
        "mean: per-token log-probs (fwd / reply tokens, bwd / context tokens); sum: summed log-probs"))
    blocklist: str | None = field(default=None, metadata=field_help(
        "file with one word per line; candidates (sampled or retrieved) containing any of them are removed"))

    def __post_init__(self) -> None:
        if not isinstance(self.use_mmi, (bool, np.bool_)):
            raise SettingsError(f"must be true or false, got {self.use_mmi!r}", field="use_mmi")
        self.use_mmi = bool(self.use_mmi)
        for name in ("forward_weight", "backward_weight", "length_weight", "retrieved_bonus"):
            _check_number(self, name, "float")
        _check_number(self, "backward_context_turns", "int")
        if self.normalize not in ("mean", "sum"):
            raise SettingsError(f"must be 'mean' or 'sum', got {self.normalize!r}", field="normalize")
        if self.blocklist is not None and not isinstance(self.blocklist, str):
            raise SettingsError(f"must be a file path, got {type(self.blocklist).__name__}", field="blocklist")


GENERATION_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationSettings))
MMI_FIELDS = frozenset(f.name for f in dataclasses.fields(MMISettings))


def _check_number(obj: Any, name: str, type_name: Any) -> None:
    """Type (int stays int, float may be given as int) and BOUNDS of one numeric field; floats finite."""
    value = getattr(obj, name)
    is_int = str(type_name) in ("int", "<class 'int'>")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SettingsError(f"must be a number, got {value!r}", field=name)
    if is_int:
        if float(value) != int(value):
            raise SettingsError(f"must be a whole number, got {value!r}", field=name)
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"must be a finite number, got {value!r}", field=name)
    lo, hi = BOUNDS[name]
    if not lo <= value <= hi:
        opening = "(" if name in OPEN_BELOW else "["   # say the range the checks below really allow
        raise SettingsError(f"must be in {opening}{lo:g}, {hi:g}], got {value!r}", field=name)
    setattr(obj, name, value)


# --seed of every face: a whole number in [0, SEED_MAX]. The engine draws its own seeds in this range, and torch's
# generators take no more than 2**64 - 1 (interact seeds turn i with seed + i, which must fit too); numpy's
# seed sequences refuse negatives. Commands whose seed goes where less fits pass their own `maximum`.
SEED_MAX = (1 << 63) - 1


def check_seed(value: Any, field: str, maximum: int = SEED_MAX) -> None:
    """SettingsError naming `field` unless `value` is a whole number in [0, maximum] (None: no seed, allowed)."""
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SettingsError(f"must be a whole number, got {value!r}", field=field)
    if not 0 <= value <= maximum:
        raise SettingsError(f"must be in [0, {maximum}], got {value}", field=field)


def apply_overrides(generation: GenerationSettings, mmi: MMISettings,
                    overrides: dict[str, Any]) -> tuple[GenerationSettings, MMISettings]:
    """New settings with keyword `overrides` applied (validated again); an unknown name is a SettingsError."""
    unknown = sorted(set(overrides) - GENERATION_FIELDS - MMI_FIELDS)
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; known: {sorted(GENERATION_FIELDS | MMI_FIELDS)}",
                            field=unknown[0])
    gen = {k: v for k, v in overrides.items() if k in GENERATION_FIELDS}
    mm = {k: v for k, v in overrides.items() if k in MMI_FIELDS}
    return (dataclasses.replace(generation, **gen) if gen else generation,
            dataclasses.replace(mmi, **mm) if mm else mmi)


def resolve_auto(gen: GenerationSettings, has_index: bool) -> GenerationSettings:
    """`gen` with its automatic counts made concrete: `retrieval_candidates` -1 -> AUTO_RETRIEVAL_CANDIDATES with
    an index, else 0; then `num_candidates` -1 -> AUTO_NUM_CANDIDATES_WITH_RETRIEVAL when retrieved replies
    join the samples, else AUTO_NUM_CANDIDATES."""
    if gen.retrieval_candidates < 0:
        gen = dataclasses.replace(gen, retrieval_candidates=AUTO_RETRIEVAL_CANDIDATES if has_index else 0)
    if gen.num_candidates < 0:
        gen = dataclasses.replace(gen, num_candidates=AUTO_NUM_CANDIDATES_WITH_RETRIEVAL
                                  if gen.retrieval_candidates > 0 else AUTO_NUM_CANDIDATES)
    return gen


def split_overrides(settings: dict[str, Any]) -> tuple[GenerationSettings, MMISettings]:
    """GenerationSettings and MMISettings from one flat dict of fields (defaults for the rest)."""
    return apply_overrides(GenerationSettings(), MMISettings(), settings)


# ------------------------------------------------------------------------------------------ the score

def mmi_active(mmi: MMISettings, has_backward: bool) -> bool:
    """THE "is MMI on" test: a backward model is loaded and use_mmi is set."""
    return has_backward and mmi.use_mmi


def score_terms(fwd, bwd, num_tokens, num_context_tokens, normalize: str):
    """The forward and backward values that enter `mmi_score`: per token for normalize="mean" (fwd / reply
    tokens, bwd / context tokens), the summed log-probs for "sum". The faces show these, so that the score
    can be checked from the columns."""
    if normalize == "mean":
        return fwd / num_tokens, bwd / np.maximum(num_context_tokens, 1)
    return fwd, bwd


def mmi_score(fwd, bwd, num_tokens, num_context_tokens, forward_weight, backward_weight, length_weight,
              normalize: str, retrieved=0.0, retrieved_bonus: float = 0.0):
    """THE ranking score: forward_weight · fwd + backward_weight · bwd + length_weight · num_tokens
    (+ retrieved_bonus for a reply retrieved from the index: `retrieved` 1 or 0), with per-token terms for
    normalize="mean" (fwd / reply tokens, bwd / context tokens): `score_terms`.

    Works on floats and on numpy arrays (weights may broadcast), so the evaluator's weight sweep computes
    exactly what the chat ranks by.
    """
    fwd, bwd = score_terms(fwd, bwd, num_tokens, num_context_tokens, normalize)
    return forward_weight * fwd + backward_weight * bwd + length_weight * num_tokens + retrieved_bonus * retrieved


def score_formula(weights: tuple[float, float, float], normalize: str, names: tuple[str, str, str] | None = None,
                  score: str = "score", retrieved_bonus: float | None = None, retrieved: str = "retrieved") -> str:
    """`mmi_score` with these (forward, backward, length) weights as one line of text, e.g.
    "score = 0·fwd/tok + 1·bwd/ctx + 0·tok"; `names`: what the forward term, the backward term and the
    reply length are called in the table beside it (default: as in the terminal's /debug table);
    `retrieved_bonus`: add its term (`retrieved`: what the 1-or-0 of a retrieved reply is called)."""
    if names is None:
        names = ("fwd/tok", "bwd/ctx", "tok") if normalize == "mean" else ("fwd", "bwd", "tok")
    terms = [f"{w:g}·{name}" for w, name in zip(weights, names)]
    if retrieved_bonus is not None:
        terms.append(f"{retrieved_bonus:g}·{retrieved}")
    return f"{score} = " + " + ".join(terms)


def ranking_weights(mmi: MMISettings, use_backward: bool) -> tuple[float, float, float]:
    """(forward, backward, length) weights the engine ranks by: with MMI off, the forward score alone."""
    if use_backward:
        return mmi.forward_weight, mmi.backward_weight, mmi.length_weight
    return 1.0, 0.0, mmi.length_weight


# ------------------------------------------------------------------------------------ which bot to load

# --quantize values: float32 weights, every weight at float16 precision (the faces' default; arithmetic in
# float32), both models' matmuls in dynamic int8, or the forward model's only
QUANTIZATIONS = ("none", "fp16", "int8", "int8-forward")
# the one default, for the faces' --quantize and ChatBot.from_pretrained alike
DEFAULT_QUANTIZE = "fp16"
# what a null in a run file (--config) means for settings whose null once meant a value: run files written
# before fp16 became the default say "quantize": null for the float32 weights
NULL_IN_RUN_FILES = {"quantize": "none"}


@dataclass
class BotArguments:
    """Which bot to load and where: the flags every face that chats shares (interact, web, evaluate)."""

    model: str | None = field(default=None, metadata=field_help(
        "bot directory (forward/ + backward/, MMI on) or one forward model directory (MMI off); "
        "default: checkpoints/default of a source checkout (a regular pip install has none: pass --model DIR)"))
    backward: str | None = field(default=None, metadata=field_help(
        "a backward model directory, when --model is a single forward model directory"))
    device: str = field(default="cpu", metadata=field_help("torch device for the models (cpu, cuda, ...)"))
    quantize: str = field(default=DEFAULT_QUANTIZE, metadata=field_help(
        "'fp16': every weight rounded to float16 precision, arithmetic in float32 (on CPU fbgemm's fp16-weight "
        "matmuls: faster; next-token distributions within float16 rounding of float32's); 'none': the float32 "
        "weights as trained; 'int8': dynamic int8 quantization of both models' matmuls (CPU only; slightly "
        "different scores); 'int8-forward': of the forward model only, the backward model in float32, so MMI "
        "scores candidates exactly as with 'none' (docs/engine.md, fp16 and int8, has the measurements)"))
    threads: int = field(default=0, metadata=field_help(
        "intra-op CPU threads per reply: 0 = the thread policy (auto: the cores other processes leave free, "
        "shared by the replies in flight); N = always N (docs/engine.md, Threads)"))
    layout: str | None = field(default=None, metadata=field_help(
        "input layout of both models: 'chitchat' ([CLS] u1 [SEP] u2 [SEP] ...: ours, GPT2-chitchat's) or 'cdial' "
        "(speaker tokens and token types: CDial-GPT's); default: each model's card, else its vocabulary's "
        "(docs/foreign_checkpoints.md)"))

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise SettingsError(f"unknown layout {self.layout!r}; use one of {LAYOUTS}", field="layout")
        if self.backward and not self.model:
            raise SettingsError("--backward needs --model (the forward model directory)", field="backward")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 0 <= self.threads <= 1024:
            raise SettingsError(f"must be in [0, 1024], got {self.threads!r}", field="threads")
        if self.quantize is None:  # the Python API's None = float32 weights
            self.quantize = "none"
        if self.quantize not in QUANTIZATIONS:
            raise SettingsError(f"unknown quantization {self.quantize!r}; use one of {QUANTIZATIONS}",
                                field="quantize")
