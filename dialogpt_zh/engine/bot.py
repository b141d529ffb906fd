"""The reply engine: sample N candidates with the forward model, rerank them by MMI with the backward model.

One engine for every face (interact CLI, web page, evaluator, benchmarks); see docs/engine.md.

Generation: the context `[CLS] u1 [SEP] ... uk [SEP]` is run through the forward model ONCE (batch 1), its
KV cache is repeated to N rows, and the N candidates are then decoded together one token per step; a row
that emits [SEP] leaves the batch (and the cache), so finished candidates stop costing compute. The forward
log-prob of each candidate (reply tokens + final [SEP], under the unfiltered model distribution) is collected
on the way, so it costs nothing extra.

MMI: the backward model reads `[CLS] reply [SEP] uk [SEP] ... u1 [SEP]` for all candidates in one
right-padded batch, and only the context tokens (everything after the reply's [SEP]) are scored: never the
reply's own tokens and never padding. (GPT2-chitchat averages the loss over the whole sequence, so a
self-predicting reply such as 哈哈哈哈 wins.)

score = forward_weight * fwd + backward_weight * bwd + length_weight * num_tokens, where with
normalize="mean" fwd and bwd are per token (fwd / num_tokens, bwd / num_context_tokens).
"""
from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dialogpt_zh.checkpoint import load_model, model_layout
from dialogpt_zh.engine.decoding import (
    DecodeBatch,
    HFDecoder,
    JobRows,
    LeanDecoder,
    ReplyJob,
    backward_context,
    n_positions,
    pad_rows,
    score_batches,
    sum_per_row,
    token_logprobs,
)
from dialogpt_zh.engine.fp16 import weights_fp16
from dialogpt_zh.engine.lean_gpt2 import LeanGPT2
from dialogpt_zh.engine.loading import (
    check_device,
    check_direction,
    check_vocabulary_size,
    cleaning_options,
    normalize_utterance,
    quantize_int8,
    resolve_bot_dirs,
    same_tokenizer,
    vocabulary_difference,
)
from dialogpt_zh.engine.results import HISTORY_NOTICE_PREFIX, Candidate, Reply
from dialogpt_zh.engine.retrieval import load_index, merge_hits, pick_hits
from dialogpt_zh.engine.sampling import NEG_INF, apply_repetition_penalty, ban_repeated_ngrams, sample_rows
from dialogpt_zh.engine.threads import ThreadPolicy
from dialogpt_zh.errors import UserError
from dialogpt_zh.sequence import Layout, infer_layout
from dialogpt_zh.settings import (
    DEFAULT_QUANTIZE,
    GENERATION_FIELDS,
    MMI_FIELDS,
    QUANTIZATIONS,
    BotArguments,
    GenerationSettings,
    MMISettings,
    SettingsError,
    apply_overrides,
    mmi_active,
    mmi_score,
    ranking_weights,
    resolve_auto,
)
from dialogpt_zh.tokenizer import decode, encode, load_tokenizer

# ------------------------------------------------------------------------------------------- helpers


def _uses_thread_policy(method):
    """Runs a public call inside `self.thread_policy.use()`: threads chosen for this call and set in the
    calling thread (torch's count is per thread); the Reply(s) it returns record them."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.thread_policy.use() as threads:
            result = method(self, *args, **kwargs)
        for r in result if isinstance(result, list) else [result]:
            if isinstance(r, Reply):
                r.threads = threads
        return result
    return wrapper


# the fewest context tokens a sequence must have room for (a turn and its [SEP])
MIN_CONTEXT_TOKENS = 2
# a BERT vocabulary's placeholder tokens, never sampled
UNUSED_TOKEN = re.compile(r"\[unused\d+\]")
# The generation settings a scoring call reads (which turns it sees). A keyword override of a setting the call
# does not read would change nothing, so it is refused rather than dropped.
CONTEXT_FIELDS = frozenset({"max_history", "max_context_tokens"})
# what retrieval reads: how many replies, and the longest a reply may be (what a sampled one may have)
RETRIEVAL_FIELDS = frozenset({"retrieval_candidates", "max_length"})


def check_text(value: Any, what: str, field: str) -> str:
    """`value` if it is text the tokenizer can read, else a UserError naming `what` (e.g. "utterance 2"): a str
    with an unpaired surrogate (JSON "\\ud800", undecodable bytes) is no Unicode text and would fail deep in it."""
    if not isinstance(value, str):
        raise UserError(f"{what} is {type(value).__name__}, not str", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid Unicode text (an unpaired surrogate U+{ord(value[e.start]):04X} at "
                        f"character {e.start})", field=field) from None
    return value


def refuse_unread(call: str, overrides: dict[str, Any], reads: frozenset[str]) -> None:
    """SettingsError for a known setting in `overrides` that `call` does not read (unknown names are left to
    `apply_overrides`, which says they are unknown)."""
    unread = sorted((set(overrides) & (GENERATION_FIELDS | MMI_FIELDS)) - reads)
    if unread:
        raise SettingsError(f"{call} does not use {', '.join(unread)}; it reads {', '.join(sorted(reads))}",
                            field=unread[0])


# ----------------------------------------------------------------------------------------------- engine

# Over 600 lines on purpose: this module is the ChatBot class, whose public calls (reply, reply_many, rerank,
# the log-prob calls) share one settings path, one context encoder and one scorer; decoding, loading, results
# and the lean forward already live in their own modules.
class ChatBot:
    """Forward model (+ optional backward model) and the settings to chat with them. Thread-safe for replies."""

    def __init__(self, forward_model, tokenizer, backward_model=None, *, device: str = "cpu",
                 generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
                 notices: Sequence[str] = (), forward_dir: Path | None = None,
                 backward_dir: Path | None = None, retrieval=None, forward_layout: Layout | None = None,
                 backward_layout: Layout | None = None) -> None:
        self.forward_model = forward_model
        self.backward_model = backward_model
        self.tokenizer = tokenizer
        self.device = device
        self.generation = generation if generation is not None else GenerationSettings()
        self.mmi_settings = mmi if mmi is not None else MMISettings()
        for value, kind in ((self.generation, GenerationSettings), (self.mmi_settings, MMISettings)):
            if not isinstance(value, kind):
                raise TypeError(f"expected a {kind.__name__}, got {type(value).__name__}")
        self.notices = list(notices)
        # the retrieval index (dialogpt_zh.data.retrieval.RetrievalIndex) or None: retrieval_candidates needs one
        self.retrieval = retrieval
        self.require_index(self.generation.retrieval_candidates)
        self.forward_dir = forward_dir
        self.backward_dir = backward_dir
        # user input is normalised with the options the training data was cleaned with (the model card's)
        self.cleaning = cleaning_options(forward_dir)
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        # how each model's inputs are built (dialogpt_zh.sequence); models passed in: their vocabulary's layout
        inferred = Layout.for_tokenizer(infer_layout(tokenizer.get_vocab()), tokenizer)
        self.forward_layout = forward_layout or inferred
        self.backward_layout = backward_layout or inferred
        # never emitted: every special token but [SEP] (which ends a reply), the layout's speaker tokens too
        specials = (set(tokenizer.all_special_ids) | {tokenizer.unk_token_id, self.pad_id, self.cls_id}
                    | set(self.forward_layout.special_ids))
        vocab = forward_model.config.vocab_size
        # ids no token has (embedding rows beyond the tokenizer, a vocab.txt's duplicate lines) cannot be shown
        known = set(tokenizer.get_vocab().values())
        specials |= {i for i in range(vocab) if i not in known}
        # BERT vocabularies' placeholders ([unused1] ...) are no text: a model that never saw them can still
        # give them probability (random or barely trained rows)
        specials |= {i for t, i in tokenizer.get_vocab().items() if UNUSED_TOKEN.fullmatch(t)}
        self.banned_ids = sorted(i for i in specials if i is not None and i != self.sep_id and i < vocab)
        self._blocklists: dict[tuple[str, float], list[str]] = {}
        if self.mmi_settings.blocklist:
            self._blocklist(self.mmi_settings.blocklist)  # a missing file is an error now, not on every reply
        positions, fixed = self._positions()   # the layout's own tokens and the shortest context must fit too
        if self.generation.max_length + fixed + MIN_CONTEXT_TOKENS > positions:
            raise UserError(f"must be at most {positions - fixed - MIN_CONTEXT_TOKENS} for these models ({positions} "
                            f"positions), got {self.generation.max_length}", field="max_length")
        # GPT-2 models run through LeanGPT2 (same results, less per-call overhead); False: always transformers
        self.use_lean_forward = True
        # intra-op threads per call: auto (the cores other processes leave free, shared by the calls in flight)
        self.thread_policy = ThreadPolicy()
        # how from_pretrained loaded the weights (a QUANTIZATIONS value; models passed in: as they are)
        self.quantize = "none"

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, forward: str | Path | None = None,
                        backward: str | Path | None = None, device: str = "cpu",
                        quantize: str | None = DEFAULT_QUANTIZE,
                        generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
                        retrieval: str | Path | None = None, layout: str | None = None) -> "ChatBot":
        """Load a bot: `path` = a dir with forward/ (+ backward/, + retrieval/: the index of human replies),
        or one forward model dir (MMI off), or None for the default `checkpoints/default`; or `forward=` /
        `backward=` paths; `retrieval=` an index directory (default: a bot dir's retrieval/). Any model may be
        one made elsewhere (GPT2-chitchat, CDial-GPT2, uer/gpt2-chinese: pytorch_model.bin + vocab.txt) or a hub
        id. `layout`: "chitchat" or "cdial" for both models (default: each model's card, else its vocabulary's;
        docs/foreign_checkpoints.md). `generation` / `mmi` become this bot's default settings (each call may
        override single fields). `quantize`: "fp16" (the default, as every face's `--quantize`: weights at
        float16 precision, float32 arithmetic), "none" (or None) = the float32 weights as saved, "int8" or
        "int8-forward" (docs/engine.md)."""
        check_device(device)
        forward_dir, backward_dir = resolve_bot_dirs(path, forward, backward)
        quantize = None if quantize == "none" else quantize
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise UserError(f"unknown quantization {quantize!r}; use one of {QUANTIZATIONS}", field="quantize")
        if quantize and quantize.startswith("int8") and not str(device).startswith("cpu"):
            raise UserError("int8 dynamic quantization runs on CPU only; use --device cpu", field="quantize")
        check_direction(forward_dir, "forward")
        tokenizer = load_tokenizer(forward_dir)
        forward_model = load_model(forward_dir, device)
        notices = []
        backward_model = None
        if backward_dir is None:
            notices.append("MMI off: no backward model, candidates are ranked by the forward score only")
        else:
            check_direction(backward_dir, "backward")
            backward_tokenizer = load_tokenizer(backward_dir)
            if not same_tokenizer(tokenizer, backward_tokenizer):
                raise UserError(f"the backward model's tokenizer differs from the forward model's ({forward_dir}: "
                                f"{vocabulary_difference(tokenizer, backward_tokenizer)}); a forward and a backward "
                                "model pair only when their vocabularies are the same", path=backward_dir)
            backward_model = load_model(backward_dir, device)
        for model_dir, model in ((forward_dir, forward_model), (backward_dir, backward_model)):
            if model is not None:
                check_vocabulary_size(model, tokenizer, model_dir)
        if quantize == "fp16":
            forward_model = weights_fp16(forward_model)
            backward_model = weights_fp16(backward_model) if backward_model is not None else None
        elif quantize == "int8":
            forward_model = quantize_int8(forward_model)
            backward_model = quantize_int8(backward_model) if backward_model is not None else None
            notices.append("int8 dynamic quantization on")
        elif quantize == "int8-forward":  # the sampler in int8, the MMI judge exact
            forward_model = quantize_int8(forward_model)
            notices.append("int8 dynamic quantization on (forward model only; MMI scores in float)")
        # a bot directory (given, or the default) brings its retrieval/; single model dirs do not
        bot_dir = Path(path) if path is not None else forward_dir.parent if forward is None else None
        index = load_index(bot_dir if bot_dir is not None and (bot_dir / "forward").is_dir() else None, retrieval,
                           tokenizer)
        bot = cls(forward_model, tokenizer, backward_model, device=device, generation=generation, mmi=mmi,
                  notices=notices, forward_dir=forward_dir, backward_dir=backward_dir, retrieval=index,
                  forward_layout=model_layout(forward_dir, tokenizer, layout),
                  backward_layout=model_layout(backward_dir, tokenizer, layout) if backward_dir else None)
        bot.quantize = quantize or "none"
        return bot

    # ---------------------------------------------------------------------------------- context

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, normalize_utterance(text, **self.cleaning))

    def _check_history(self, history) -> list[str]:
        if isinstance(history, str):
            history = [history]
        if not isinstance(history, (list, tuple)) or not history:
            raise UserError("history must be a non-empty list of utterances (oldest first)", field="history")
        return [check_text(u, f"utterance {i}", "history") for i, u in enumerate(history)]

    def _encode_replies(self, replies: Sequence[str]) -> list[list[int]]:
        """Token ids of replies to score; a lone str is refused (iterating it would score its characters)."""
        if isinstance(replies, str) or not isinstance(replies, Sequence):
            raise UserError(f"candidates must be a list of strings, got {type(replies).__name__}",
                            field="candidates")
        ids = [self._encode(check_text(r, f"candidate {i}", "candidates")) for i, r in enumerate(replies)]
        positions, fixed = self._positions()
        limit = positions - fixed - MIN_CONTEXT_TOKENS   # what prepare_context would refuse
        for i, r in enumerate(ids):
            if not r:  # scored as [SEP] alone it is no reply, yet short enough to rank first ("best": "")
                raise UserError(f"candidate {i} is empty after cleaning ({replies[i]!r})", field="candidates")
            if len(r) > limit:
                raise UserError(f"candidate {i} has {len(r)} tokens; at most {limit} fit beside a context in these "
                                f"models ({positions} positions)", field="candidates")
        return ids

    def _positions(self) -> tuple[int, int]:
        """(the positions every loaded model has, the layout's own tokens in a sequence: [CLS] and the reply's
        [SEP], cdial's + the reply's speaker token)."""
        models = [m for m in (self.forward_model, self.backward_model) if m is not None]
        return min(n_positions(m) for m in models), max(self._layout(m).extra_tokens for m in models) + 1

    def prepare_context(self, history, gen: GenerationSettings, reply_room: int,
                        notices: list[str]) -> tuple[list[list[int]], list[str]]:
        """Token ids of the turns the model will see (oldest first) and their normalised text.

        Keeps the last `max_history` turns, then drops the oldest turns until the context fits the token
        budget (min of max_context_tokens and what the models' positions leave after `reply_room` tokens);
        a single over-long latest turn keeps its last tokens. Every cut is reported in `notices`.
        """
        history = self._check_history(history)
        texts = [normalize_utterance(u, **self.cleaning) for u in history]
        if not texts[-1].strip():
            raise UserError("the latest utterance is empty", field="history")
        if len(texts) > gen.max_history:
            notices.append(f"{HISTORY_NOTICE_PREFIX}kept the last {gen.max_history} of {len(texts)} utterances "
                           f"(max_history)")
            texts = texts[-gen.max_history:]
        turns = [encode(self.tokenizer, t) for t in texts]
        positions, fixed = self._positions()
        budget = min(gen.max_context_tokens, positions - reply_room - fixed)
        if budget < MIN_CONTEXT_TOKENS:
            raise UserError(f"max_length {reply_room} leaves no room for context in a model of {positions} positions",
                            field="max_length")
        dropped = 0
        while len(turns) > 1 and sum(len(t) + 1 for t in turns) > budget:
            turns.pop(0)
            texts.pop(0)
            dropped += 1
        if dropped:
            notices.append(f"{HISTORY_NOTICE_PREFIX}dropped the {dropped} oldest utterance(s) to fit {budget} "
                           f"context tokens")
        if len(turns[-1]) + 1 > budget:
            notices.append(f"input truncated: your message has {len(turns[-1])} tokens, kept its last "
                           f"{budget - 1}")
            turns[-1] = turns[-1][-(budget - 1):]
            texts[-1] = decode(self.tokenizer, turns[-1])
        return turns, texts

    # ---------------------------------------------------------------------------------- generation

    def _next_tokens(self, logits: torch.Tensor, history: torch.Tensor | None, tokens: list[list[int]],
                     steps: torch.Tensor, gen: GenerationSettings, draws: list[tuple[int, torch.Generator]],
                     banned: torch.Tensor) -> torch.Tensor:
        """One token per row of consecutive requests with the same settings `gen`: the filters (penalty, bans,
        length limits at each row's step `steps`) once over all their rows, each request's draws from its own
        generator (`draws`: (live rows, generator) per request, in row order)."""
        scores = apply_repetition_penalty(logits, history, gen.repetition_penalty)
        if scores is logits:
            scores = logits.clone()
        scores[:, banned] = NEG_INF
        short = steps < gen.min_length
        if bool(short.any()):
            scores[short, self.sep_id] = NEG_INF
        cut = steps >= gen.max_length                       # cut: the reply ends here
        if bool(cut.any()):
            scores[cut] = NEG_INF
            scores[cut, self.sep_id] = 0.0
        scores = ban_repeated_ngrams(scores, tokens, gen.no_repeat_ngram_size)
        dead = scores.amax(dim=-1) == NEG_INF                # everything banned (tiny vocab): end the reply
        if bool(dead.any()):
            scores[dead, self.sep_id] = 0.0
        return sample_rows(scores, gen.temperature, gen.top_k, gen.top_p, draws)

    @torch.inference_mode()
    def _generate(self, jobs: "list[ReplyJob]") -> list[JobRows]:
        """Sample each job's gen.num_candidates replies, all jobs in one `DecodeBatch` (in job order)."""
        batch = DecodeBatch(self)
        if len(jobs) > 1 and not batch.joins_running_batches:  # the HF cache has one length: one by one
            return [self._generate([job])[0] for job in jobs]
        batch.admit(jobs)
        done: dict[int, JobRows] = {}
        while len(batch):
            for request in batch.step():
                done[id(request.job)] = request
        return [done[id(job)] for job in jobs]

    # ---------------------------------------------------------------------------------- scoring

    def _forward_scores(self, context: list[list[int]], replies: list[list[int]]) -> list[tuple[float, int]]:
        """log P(reply + [SEP] | context) for each reply, in batches of at most SCORE_BATCH_TOKENS."""
        prompt = len(self.forward_layout.prompt(context)[0])
        return [s for part in score_batches([prompt + len(r) + 1 for r in replies])
                for s in self._forward_scores_batch(context, replies[part])]

    @torch.inference_mode()
    def _forward_scores_batch(self, context: list[list[int]], replies: list[list[int]]) -> list[tuple[float, int]]:
        """log P(reply + [SEP] | context) for each reply: context encoded once, replies in one padded batch."""
        model = self.forward_model
        decoder = self._decoder(model)
        prompt, prompt_types, reply_type = self.forward_layout.prompt(context)
        ctx = torch.tensor([prompt], device=self.device)
        ctx_types = torch.tensor([prompt_types], device=self.device) if prompt_types is not None else None
        rows = [r + [self.sep_id] for r in replies]
        first = decoder.prompt(ctx, max(len(r) for r in rows), ctx_types)
        first_logprobs = torch.log_softmax(first[0].float(), dim=-1)  # predicts each reply's 1st token
        fwd = [float(first_logprobs[r[0]]) for r in rows]
        if any(len(r) > 1 for r in rows):
            decoder.repeat_rows(len(rows))
            ids, mask = pad_rows(rows, self.pad_id, self.device)
            # the last column predicts nothing we score, so it is not run
            hidden = decoder.hidden_after_cache(ids[:, :-1], mask[:, :-1], reply_type)
            # hidden at reply position j predicts reply token j + 1
            score_mask = mask[:, 1:].bool()
            b, j = score_mask.nonzero(as_tuple=True)
            lp = token_logprobs(model, hidden[b, j], ids[b, j + 1])
            rest = sum_per_row(lp, b, len(rows))
            fwd = [f + r for f, r in zip(fwd, rest)]
        return [(f, len(r)) for f, r in zip(fwd, rows)]

    def _backward_scores(self, context: list[list[int]], replies: list[list[int]]) -> list[tuple[float, int]]:
        """log P(context | reply) for each reply after one context (see `_backward_scores_pairs`)."""
        return self._backward_scores_pairs([(context, r) for r in replies])

    def _backward_scores_pairs(self, pairs: list[tuple[list[list[int]], list[int]]]) -> list[tuple[float, int]]:
        """log P(context | reply) for (context, reply) pairs: `[CLS] reply [SEP] uk [SEP] ... u1 [SEP]` (or the
        backward model's own layout), context tokens only, all pairs (of one request or of many) in one batch."""
        layout = self.backward_layout
        turns = [list(context) + [r] for context, r in pairs]
        # scored: the context tokens, after the reply's turn ([CLS] reply [SEP] in the chitchat layout)
        sums = self._sequence_scores(self.backward_model, [layout.sequence(t, "backward") for t in turns],
                                     [layout.first_turn_length(t, "backward") for t in turns])
        return [(s, sum(len(u) + 1 for u in context)) for s, (context, _) in zip(sums, pairs)]

    def _forward_scores_pairs(self, pairs: list[tuple[list[list[int]], list[int]]]) -> list[tuple[float, int]]:
        """log P(reply + [SEP] | context) for (context, reply) pairs, teacher-forced, all in one batch (the
        retrieved replies of every request of a `reply_many`)."""
        built = [self.forward_layout.sequence(list(context) + [r], "forward") for context, r in pairs]
        # scored: the reply's tokens and its [SEP], the sequence's last len(reply) + 1 in either layout
        sums = self._sequence_scores(self.forward_model, built,
                                     [len(q) - len(r) - 1 for (q, _), (_, r) in zip(built, pairs)])
        return [(s, len(r) + 1) for s, (_, r) in zip(sums, pairs)]

    def _sequence_scores(self, model, seqs: list[tuple[list[int], list[int] | None]],
                         starts_at: list[int]) -> list[float]:
        """`_sequence_scores_batch` in batches of at most SCORE_BATCH_TOKENS."""
        return [s for part in score_batches([len(q) for q, _ in seqs])
                for s in self._sequence_scores_batch(model, seqs[part], starts_at[part])]

    @torch.inference_mode()
    def _sequence_scores_batch(self, model, seqs: list[tuple[list[int], list[int] | None]],
                               starts_at: list[int]) -> list[float]:
        """Sum of log P(token | everything before it) over the positions t >= starts_at of each sequence
        ((ids, token types or None), as `Layout.sequence` builds them), all in one right-padded batch."""
        ids, mask = pad_rows([q for q, _ in seqs], self.pad_id, self.device)
        types = pad_rows([ty for _, ty in seqs], self.pad_id, self.device)[0] if seqs[0][1] is not None else None
        starts = torch.tensor(starts_at, device=self.device)
        positions = torch.arange(ids.shape[1], device=self.device)
        target_mask = (positions[None, :] >= starts[:, None]) & mask.bool()
        b, t = target_mask.nonzero(as_tuple=True)
        lean = self._lean(model)
        # the last column predicts nothing, so it is not run; causal from position 0, the real tokens never
        # see the right padding (and the lean forward skips it in the matmuls). Position t - 1 predicts t.
        if lean is not None:  # its last block runs past the attention only for the positions we score
            hidden = lean.hidden(ids[:, :-1], mask=mask[:, :-1], select=b * (ids.shape[1] - 1) + t - 1,
                                 types=types[:, :-1] if types is not None else None)
        else:
            hidden = model.base_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                      token_type_ids=types[:, :-1] if types is not None else None
                                      ).last_hidden_state[b, t - 1]
        return sum_per_row(token_logprobs(model, hidden, ids[b, t]), b, len(seqs))

    def _layout(self, model) -> Layout:
        return self.backward_layout if model is self.backward_model else self.forward_layout

    def _lean(self, model) -> LeanGPT2 | None:
        # token types (cdial) too: LeanGPT2 adds their embeddings as transformers' GPT-2 does
        if not self.use_lean_forward:
            return None
        return LeanGPT2.wrap(model)

    def _decoder(self, model) -> HFDecoder:
        lean = self._lean(model)
        return LeanDecoder(model, lean) if lean is not None else HFDecoder(model)

    def _rank(self, candidates: list[Candidate], mmi: MMISettings, use_backward: bool) -> list[Candidate]:
        weights = ranking_weights(mmi, use_backward)
        for c in candidates:
            bwd = c.backward_logprob if use_backward else 0.0
            fwd = c.forward_logprob if c.forward_logprob is not None else 0.0  # None only where its weight is 0
            c.score = float(mmi_score(fwd, bwd, c.num_tokens, c.num_context_tokens, *weights, mmi.normalize,
                                      "retrieved" in c.source, mmi.retrieved_bonus))
        ranked = sorted(candidates, key=lambda c: -c.score)  # stable: ties keep sampling order
        for i, c in enumerate(ranked, 1):
            c.rank = i
        return ranked

    def _blocklist(self, path: str) -> list[str]:
        p = Path(path)
        if not p.is_file():
            from dialogpt_zh.data.cleaning import blocklist_missing_reason

            raise UserError(f"blocklist {blocklist_missing_reason(p)}", path=p, field="blocklist")
        key = (str(p), p.stat().st_mtime)
        if key not in self._blocklists:
            from dialogpt_zh.data.cleaning import load_blocklist  # the one blocklist format (BOM, comments, file:line)

            words = (normalize_utterance(w, **self.cleaning).strip() for w in load_blocklist(p))
            self._blocklists[key] = [w for w in words if w]
        return self._blocklists[key]

    def mmi_active(self, mmi: MMISettings | None = None) -> bool:
        """Whether replies are reranked by the backward model with these settings (default: the bot's)."""
        return mmi_active(mmi if mmi is not None else self.mmi_settings, self.backward_model is not None)

    def settings(self, generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
                 **overrides: Any) -> tuple[GenerationSettings, MMISettings]:
        """The settings of one call: `generation` / `mmi` (default: the bot's) with `overrides` applied, and
        the automatic counts resolved for this bot (`resolve_auto`: K -1 by whether it has an index, N -1 by K)."""
        gen, mmi = apply_overrides(generation if generation is not None else self.generation,
                                   mmi if mmi is not None else self.mmi_settings, overrides)
        return resolve_auto(gen, self.retrieval is not None), mmi

    # ---------------------------------------------------------------------------------- public API

    def prepare_reply(self, history, *, seed: int | None = None, generation: GenerationSettings | None = None,
                      mmi: MMISettings | None = None, **overrides: Any) -> "ReplyJob":
        """Settings resolved and checked, context encoded: a reply request ready for `reply_many` (bad input
        raises here, in the caller's thread, before it joins a batch)."""
        t0 = time.perf_counter()
        gen, mmi = self.settings(generation, mmi, **overrides)
        notices = list(self.notices)
        use_backward = self.mmi_active(mmi)
        if self.backward_model is not None and not use_backward:
            notices.append("MMI off (use_mmi=False): ranked by the forward score only")
        context, texts = self.prepare_context(history, gen, gen.max_length, notices)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        t1 = time.perf_counter()
        hits = self._retrieve(context, texts, gen, notices)
        return ReplyJob(gen=gen, mmi=mmi, use_backward=use_backward, context=context, texts=texts, notices=notices,
                        seed=int(seed), generator=generator, started=t0, prepared=time.perf_counter(),
                        retrieved=hits, retrieve_s=time.perf_counter() - t1 if gen.retrieval_candidates else 0.0)

    def require_index(self, retrieval_candidates: int, field: str = "retrieval_candidates") -> None:
        """UserError when `retrieval_candidates` > 0 are asked for and this bot has no index (a face's settings,
        refused up front; a per-call override without one only adds a notice to the reply)."""
        if retrieval_candidates > 0 and self.retrieval is None:
            raise UserError(f"{retrieval_candidates} retrieval candidates asked for, but this bot has no retrieval "
                            f"index (BOT_DIR/retrieval); build one with `python -m dialogpt_zh.index`", field=field)

    def _retrieve(self, context: list[list[int]], texts: list[str], gen: GenerationSettings,
                  notices: list[str]) -> list:
        """The retrieval hits of one request (`gen.retrieval_candidates` of them at most)."""
        if not gen.retrieval_candidates:
            return []
        if self.retrieval is None:
            notices.append(f"retrieval_candidates {gen.retrieval_candidates} ignored: this bot has no retrieval "
                           f"index (BOT_DIR/retrieval)")
            return []
        return pick_hits(self.retrieval, context, texts[-1], gen.retrieval_candidates, gen.max_length, notices)

    def retrieve(self, history, *, generation: GenerationSettings | None = None, **overrides: Any) -> list:
        """The retrieved replies (`dialogpt_zh.data.retrieval.Hit`, best similarity first) for `history`, as a
        reply would get them with these settings (`retrieval_candidates` of them, default 1); no model runs."""
        refuse_unread("retrieve", overrides, CONTEXT_FIELDS | RETRIEVAL_FIELDS)
        overrides.setdefault("retrieval_candidates", max(1, (generation or self.generation).retrieval_candidates))
        gen, _ = self.settings(generation, None, **overrides)
        if self.retrieval is None:
            raise UserError("this bot has no retrieval index (BOT_DIR/retrieval; build one with "
                            "`python -m dialogpt_zh.index`)", field="retrieval_candidates")
        context, texts = self.prepare_context(history, gen, gen.max_length, [])
        return self._retrieve(context, texts, gen, [])

    def reply(self, history, *, seed: int | None = None, generation: GenerationSettings | None = None,
              mmi: MMISettings | None = None, **overrides: Any) -> Reply:
        """Sample candidates for the next turn after `history` (oldest first, the user's latest last),
        rerank them, and return the best with all candidates and their scores. Settings: `generation` /
        `mmi` objects (default: the bot's), single fields as keywords (`num_candidates=5`). Runs inside the
        thread policy through `reply_many`."""
        return self.reply_many([self.prepare_reply(history, seed=seed, generation=generation, mmi=mmi,
                                                   **overrides)])[0]

    @_uses_thread_policy
    def reply_many(self, jobs: "Sequence[ReplyJob]") -> list[Reply]:
        """Replies to several prepared requests (`prepare_reply`) computed together: one sampling batch and
        one MMI batch. Each keeps its own history, seed and settings; with the lean forward a request's
        candidates are those it gets alone (up to float rounding in the shared matmuls)."""
        jobs = list(jobs)
        if not jobs:
            return []
        return self.finish_replies(self._generate(jobs))

    def decode_batch(self) -> DecodeBatch:
        """An empty `DecodeBatch` for a caller that runs its own steps (`ReplyBatcher`): `admit` prepared
        requests, `step` until they come back, then `finish_replies`. Run it inside `thread_policy.use()`
        and `torch.inference_mode()`."""
        return DecodeBatch(self)

    def finish_replies(self, requests: "Sequence[JobRows]") -> list[Reply]:
        """The replies of decoded requests: candidates (duplicates collapsed, blocklist applied), all of
        them MMI-scored in one batch, ranked."""
        jobs = [r.job for r in requests]
        # this call's notices (a job may be run again, e.g. alone after a failed batch: notices not doubled)
        notices = [list(job.notices) for job in jobs]
        per_job: list[list[Candidate]] = []
        retrieved: list[tuple[ReplyJob, Candidate]] = []  # retrieved only: their forward score is still to compute
        for request, job_notices in zip(requests, notices):
            job = request.job
            by_text: dict[str, Candidate] = {}
            n_ctx = sum(len(u) + 1 for u in backward_context(job.context, job.mmi))
            for ids, fwd in request.samples():
                text = decode(self.tokenizer, ids)
                if text in by_text:
                    by_text[text].count += 1
                    continue
                by_text[text] = Candidate(text=text, token_ids=ids, forward_logprob=fwd, backward_logprob=None,
                                          num_tokens=len(ids) + 1, num_context_tokens=n_ctx, score=0.0)
            retrieved += [(job, c) for c in merge_hits(by_text, job.retrieved, n_ctx)]
            candidates = list(by_text.values())
            if job.mmi.blocklist:
                words = self._blocklist(job.mmi.blocklist)
                kept = [c for c in candidates if not any(w in c.text for w in words)]
                if len(kept) < len(candidates):
                    job_notices.append(f"blocklist removed {len(candidates) - len(kept)} of {len(candidates)} "
                                       "candidates")
                candidates = kept
            per_job.append(candidates)
        scoring = time.perf_counter()

        # Teacher-forced, one forward batch for every request's retrieved replies, but only where the ranking
        # reads the forward term: the default ranks by the backward score alone, and the pass costs about as
        # much as the MMI pass over those replies. Elsewhere a retrieved reply's forward_logprob stays None.
        retrieved = [(job, c) for job, c in retrieved if ranking_weights(job.mmi, job.use_backward)[0] != 0]
        if retrieved:
            for (_, c), (fwd, _) in zip(retrieved, self._forward_scores_pairs(
                    [(job.context, c.token_ids) for job, c in retrieved])):
                c.forward_logprob = fwd
        scored = [(job, c) for job, cands in zip(jobs, per_job) if job.use_backward for c in cands]
        if scored:
            for (job, c), (bwd, _) in zip(scored, self._backward_scores_pairs(
                    [(backward_context(job.context, job.mmi), c.token_ids) for job, c in scored])):
                c.backward_logprob = bwd
        replies = []
        for job, candidates, job_notices in zip(jobs, per_job, notices):
            ranked = self._rank(candidates, job.mmi, job.use_backward)
            if not ranked:
                job_notices.append("no reply: every candidate contained a blocklisted word")
            replies.append(ranked)
        end = time.perf_counter()
        return [Reply(text=ranked[0].text if ranked else "", candidates=ranked, latency_s=end - r.job.started,
                      timings={"encode": r.job.prepared - r.job.started - r.job.retrieve_s,
                               "retrieve": r.job.retrieve_s, "wait": r.admitted - r.job.prepared,
                               "generate": scoring - r.admitted, "score": end - scoring},
                      mmi=r.job.use_backward, notices=job_notices, seed=r.job.seed, context=r.job.texts,
                      batch_size=r.batch_size, weights=ranking_weights(r.job.mmi, r.job.use_backward),
                      normalize=r.job.mmi.normalize, retrieved_bonus=r.job.mmi.retrieved_bonus)
                for r, ranked, job_notices in zip(requests, replies, notices)]

    @_uses_thread_policy
    def rerank(self, history, candidates: Sequence[str], *, generation: GenerationSettings | None = None,
               mmi: MMISettings | None = None, **overrides: Any) -> list[Candidate]:
        """Score replies that came from anywhere (forward + backward), sorted by rank (source "given"); with
        `retrieval_candidates` K the index's K replies join them ("retrieved", or "given+retrieved" for a given
        text). Blocklist not applied (a `blocklist=` override is refused, as is any sampling setting)."""
        refuse_unread("rerank", overrides, CONTEXT_FIELDS | RETRIEVAL_FIELDS | (MMI_FIELDS - {"blocklist"}))
        if (generation or self.generation).retrieval_candidates < 0:  # auto adds none to given candidates
            overrides.setdefault("retrieval_candidates", 0)
        gen, mmi = self.settings(generation, mmi, **overrides)
        replies = self._encode_replies(candidates)
        if not replies and not gen.retrieval_candidates:
            return []
        room = max(map(len, replies), default=0)  # retrieved replies may be up to max_length tokens long
        context, texts = self.prepare_context(history, gen, max(room, gen.max_length) if gen.retrieval_candidates
                                              else room, [])
        n_ctx = sum(len(u) + 1 for u in backward_context(context, mmi))
        cands = [Candidate(text=text, token_ids=ids, forward_logprob=0.0, backward_logprob=None, num_tokens=0,
                           num_context_tokens=n_ctx, score=0.0, count=0, source="given")
                 for text, ids in zip(candidates, replies)]
        by_text: dict[str, Candidate] = {}
        for c in cands:
            by_text.setdefault(c.text, c)
        cands += merge_hits(by_text, self._retrieve(context, texts, gen, []), n_ctx)
        if not cands:  # the index had nothing fit to add either
            return []
        use_backward = self.mmi_active(mmi)
        ids = [c.token_ids for c in cands]
        fwd = self._forward_scores(context, ids)
        bwd = self._backward_scores(backward_context(context, mmi), ids) if use_backward else [(None, 0)] * len(ids)
        for c, (f, n), (b, _) in zip(cands, fwd, bwd):
            c.forward_logprob, c.num_tokens, c.backward_logprob = f, n, b
            first = by_text[c.text]  # merge_hits marked the first given copy of a text the index returned
            c.source, c.similarity = first.source, first.similarity
        return self._rank(cands, mmi, use_backward)

    @_uses_thread_policy
    def forward_logprobs(self, history, replies: Sequence[str], *, generation: GenerationSettings | None = None,
                         **overrides: Any) -> list[tuple[float, int]]:
        """[(log P(reply tokens + [SEP] | context), number of those tokens)] for each reply, one batch. Reads
        `max_history` and `max_context_tokens` (the turns the model sees); other overrides are refused."""
        refuse_unread("forward_logprobs", overrides, CONTEXT_FIELDS)
        gen, _ = self.settings(generation, None, **overrides)
        ids = self._encode_replies(replies)
        if not ids:
            return []
        context, _ = self.prepare_context(history, gen, max(len(r) for r in ids), [])
        return self._forward_scores(context, ids)

    @_uses_thread_policy
    def backward_logprobs(self, history, replies: Sequence[str], *, generation: GenerationSettings | None = None,
                          mmi: MMISettings | None = None, **overrides: Any) -> list[tuple[float, int]]:
        """[(log P(context | reply), number of context tokens scored)] for each reply, one batch: the backward
        term of the ranking score. The context is the turns the model sees (`max_history`,
        `max_context_tokens`), of which the backward model scores the `backward_context_turns` latest (the
        bot's default: 1; 0 = all); other overrides are refused."""
        if self.backward_model is None:
            raise UserError("no backward model loaded, so there is no backward score", field="backward")
        refuse_unread("backward_logprobs", overrides, CONTEXT_FIELDS | {"backward_context_turns"})
        gen, mmi = self.settings(generation, mmi, **overrides)
        ids = self._encode_replies(replies)
        if not ids:
            return []
        context, _ = self.prepare_context(history, gen, max(len(r) for r in ids), [])
        return self._backward_scores(backward_context(context, mmi), ids)


def load_bot(args: BotArguments, generation: GenerationSettings | None = None,
             mmi: MMISettings | None = None) -> ChatBot:
    """The one engine for a face: which bot and where (`BotArguments`), with these settings as its defaults."""
    bot = ChatBot.from_pretrained(args.model, backward=args.backward, device=args.device, quantize=args.quantize,
                                  generation=generation, mmi=mmi, layout=args.layout)
    bot.thread_policy = ThreadPolicy(args.threads)  # 0 = auto, N = N threads per call
    return bot
