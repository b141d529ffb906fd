"""Decoding: one batch of candidate rows sampled step by step for many reply requests.

The forward model runs each context once and its KV cache is repeated to N rows; a row that emits [SEP]
leaves the batch. Two back-ends over the same loop: the lean forward (lean_gpt2.py) and transformers' own
model with its cache (anything the lean forward does not cover). `DecodeBatch` is the loop; `ChatBot`
prepares the requests and scores the results.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dialogpt_zh.engine.lean_gpt2 import DecodingRows, LeanGPT2
from dialogpt_zh.settings import (
    GenerationSettings,
    MMISettings,
)


@dataclass
class ReplyJob:
    """One reply request, prepared by `ChatBot.prepare_reply`: settings, encoded context, its own generator."""

    gen: GenerationSettings
    mmi: MMISettings
    use_backward: bool
    context: list[list[int]]
    texts: list[str]
    notices: list[str]
    seed: int
    generator: torch.Generator
    started: float                    # perf_counter at the request
    prepared: float                   # ... and when it was ready to join a batch
    retrieved: list = field(default_factory=list)  # retrieval hits (dialogpt_zh.data.retrieval.Hit) to rank too
    retrieve_s: float = 0.0           # seconds the retrieval took (part of the preparation)


def n_positions(model) -> int:
    return int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings"))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


# Scoring (teacher-forced log-probs of given or retrieved replies) runs in batches of at most this many padded
# tokens (rows x the longest row, the shared prompt counted in each row): memory grows with the batch (the LM
# head's vocabulary-wide row per scored token, the prompt's cache per row), and `rerank` takes any number of
# candidates (2,000 of 30 characters took 3.7 GB in one batch). Rows are scored alone, so batching changes no score.
SCORE_BATCH_TOKENS = 8192


def score_batches(lengths: Sequence[int], budget: int = SCORE_BATCH_TOKENS) -> list[slice]:
    """Consecutive slices of rows (of these lengths) whose padded size stays within `budget`; a row longer
    than that is a batch of its own."""
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > budget:
            batches.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if len(lengths) > start:
        batches.append(slice(start, len(lengths)))
    return batches


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(target) from selected hidden states (M, d): the LM head runs only on positions we score."""
    logits = model.get_output_embeddings()(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def backward_context(context: list[list[int]], mmi: MMISettings) -> list[list[int]]:
    """The context turns the backward model scores: the `backward_context_turns` most recent (0 = all).
    It reads them newest first after the reply, so a cut drops the tail of its sequence: the kept turns'
    log-probs are the same as with the whole context (causal), only cheaper."""
    k = mmi.backward_context_turns
    return context[-k:] if k and len(context) > k else context


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> list[float]:
    out = torch.zeros(n_rows, dtype=torch.float64)
    out.index_add_(0, rows.cpu(), values.double().cpu())
    return out.tolist()


# Models the lean forward does not cover (transformers' DynamicCache): finished candidates leave the cache (one
# copy of it) only once this share of its rows is finished; until then they decode a dummy token, because
# copying the whole cache at every finish cost more than it saved (docs/engine.md, "Figures behind the
# code"). The lean forward moves single rows instead: `DecodingRows`.
COMPACT_DEAD_SHARE = 0.5


@functools.lru_cache(maxsize=None)
def cache_argument(forward) -> str:
    """The name a transformers forward takes its KV cache by: `cache` (newer 5.x; `past_key_values` warns there
    and is to be removed) or `past_key_values` (older 5.x)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _with_cache(module, cache) -> dict:
    return {cache_argument(type(module).forward): cache}


class HFDecoder:
    """Incremental decoding through the transformers forward and its DynamicCache (any causal LM)."""

    def __init__(self, model) -> None:
        self.model = model

    def prompt(self, ids: torch.Tensor, capacity: int, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (1, L) context (with its token types, for a layout that has them) once; logits (1, V) of
        its last position."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, token_type_ids=token_types, use_cache=True, logits_to_keep=1,
                         **_with_cache(self.model, self.cache))
        return out.logits[:, -1, :]

    def repeat_rows(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)

    def step(self, ids: torch.Tensor, rows: torch.Tensor | None = None, token_type: int | None = None) -> torch.Tensor:
        """One (cache rows, 1) token per cache row; logits (len(rows), V) of the cache rows `rows` (default:
        all). `token_type`: the reply tokens' type id, for a layout that has token types."""
        types = torch.full_like(ids, token_type) if token_type is not None else None
        logits = self.model(input_ids=ids, token_type_ids=types, use_cache=True,
                            **_with_cache(self.model, self.cache)).logits[:, -1, :]
        return logits if rows is None else logits.index_select(0, rows)

    def hidden_after_cache(self, ids: torch.Tensor, mask: torch.Tensor, token_type: int | None = None) -> torch.Tensor:
        """Final hidden states of right-padded (rows, m) ids that continue the cached context (all of token type
        `token_type` when the layout has token types)."""
        full_mask = torch.cat([torch.ones((ids.shape[0], self.cache.get_seq_length()), dtype=torch.long,
                                          device=ids.device), mask], dim=1)
        types = torch.full_like(ids, token_type) if token_type is not None else None
        # positions continue after the context (default: cache length + arange), right padding is harmless
        base = self.model.base_model
        return base(input_ids=ids, token_type_ids=types, attention_mask=full_mask, use_cache=True,
                    **_with_cache(base, self.cache)).last_hidden_state


class LeanDecoder(HFDecoder):
    """`prompt`, `repeat_rows` and `hidden_after_cache` through `LeanGPT2` (plain torch ops, preallocated KV
    cache): same results, less per-call overhead. The cache holds the context plus `capacity` more positions."""

    def __init__(self, model, lean: LeanGPT2) -> None:
        self.model, self.lean = model, lean

    def prompt(self, ids: torch.Tensor, capacity: int, token_types: torch.Tensor | None = None) -> torch.Tensor:
        self.cache = self.lean.new_cache(1, ids.shape[1] + capacity)
        return self.lean.logits(self.lean.hidden(ids, self.cache, types=token_types)[:, -1, :])

    def repeat_rows(self, n: int) -> None:
        self.cache.repeat_rows(n)

    def hidden_after_cache(self, ids: torch.Tensor, mask: torch.Tensor, token_type: int | None = None) -> torch.Tensor:
        types = torch.full_like(ids, token_type) if token_type is not None else None
        return self.lean.hidden(ids, self.cache, types=types)  # causal over cache + new tokens; padding comes last


class HFRows:
    """`DecodingRows`' interface over the transformers forward, for models LeanGPT2 does not cover: one
    request at a time (its DynamicCache has one length for all rows), finished rows decode a dummy token
    until COMPACT_DEAD_SHARE of the rows are finished."""

    def __init__(self, model, device: str, dummy_id: int, compact_dead_share: float) -> None:
        self.decoder, self.device = HFDecoder(model), device
        self.dummy_id, self.compact_dead_share = dummy_id, compact_dead_share
        self.rows: int | None = None          # cache rows, finished ones included; None before `admit`
        self.reply_type: int | None = None    # the reply tokens' type id (layouts with token types)

    def admit(self, contexts: list[list[int]], counts: list[int], room: int,
              token_types: list[list[int]] | None = None, reply_types: list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is not None or len(contexts) != 1:
            raise ValueError("the transformers forward decodes one request at a time")
        types = torch.tensor(token_types, device=self.device) if token_types is not None else None
        self.reply_type = reply_types[0] if reply_types is not None else None
        logits = self.decoder.prompt(torch.tensor(contexts, device=self.device), room, types)
        self.decoder.repeat_rows(counts[0])  # the context is encoded once and shared by the n rows
        self.rows = counts[0]
        return torch.arange(counts[0], device=self.device), logits.expand(counts[0], -1)

    def leave(self, live: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        live = live[~finished]
        dead = self.rows - len(live)
        if dead >= self.compact_dead_share * self.rows:
            self.decoder.select_rows(live)
            self.rows = len(live)
            return torch.arange(len(live), device=live.device)
        return live

    def step(self, ids: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        if len(live) == self.rows:  # no finished rows in the cache: live is 0..n-1 in order
            return self.decoder.step(ids.view(-1, 1), token_type=self.reply_type)
        full = torch.full((self.rows, 1), self.dummy_id, dtype=torch.long, device=ids.device)
        full[live, 0] = ids.view(-1)
        return self.decoder.step(full, live, self.reply_type)


class JobRows:
    """One request's candidates while they decode: tokens so far, forward log-prob sums, steps taken."""

    def __init__(self, job: "ReplyJob") -> None:
        n = job.gen.num_candidates
        self.job, self.live, self.step = job, n, 0
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.fwd = torch.zeros(n, dtype=torch.float64)
        self.admitted = time.perf_counter()   # when it joined its batch (`DecodeBatch.admit` sets it)
        self.batch_size = 1               # requests decoding in its batch when it joined (itself included)

    def samples(self) -> list[tuple[list[int], float]]:
        return [(tokens, float(f)) for tokens, f in zip(self.tokens, self.fwd)]


class DecodeBatch:
    """The candidates of several requests decoding together, one token per row per step, each request with
    its own filters and generator (its draws do not depend on the others). Requests may join between steps
    (`admit`: with the lean forward, continuous batching: a request starts at the next step instead of when
    the batch ends) and each leaves as soon as its last candidate is finished (`step` returns it).

    Rows stay grouped by request in admission order, so each request owns one slice of the rows."""

    def __init__(self, bot: Any) -> None:  # the ChatBot whose models and settings decode (bot.py imports us)
        self.bot = bot
        lean = bot._lean(bot.forward_model)
        self.rows = (DecodingRows(lean) if lean is not None
                     else HFRows(bot.forward_model, bot.device, bot.sep_id, COMPACT_DEAD_SHARE))
        # whether requests can join a batch that is running (the lean forward); else one request at a time
        self.joins_running_batches = lean is not None
        device = bot.device
        self.banned = torch.tensor(bot.banned_ids, dtype=torch.long, device=device)
        self.requests: list[JobRows] = []
        self.slots = torch.zeros(0, dtype=torch.long, device=device)   # cache slot of each live row
        self.candidate = torch.zeros(0, dtype=torch.long)              # its candidate index in its request
        self.logits: torch.Tensor | None = None                        # (rows, V) for the next token
        # (rows, steps) tokens so far for the repetition penalty; rows that joined later are left-padded
        # with a banned token (its score is set to -inf after the penalty anyway)
        self.history = torch.zeros(0, 0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        """Requests still decoding."""
        return len(self.requests)

    @property
    def live_rows(self) -> int:
        return len(self.slots)

    def admit(self, jobs: "Sequence[ReplyJob]") -> None:
        """Jobs join: each context encoded once (all in one padded pass) and repeated to its rows."""
        if not jobs:
            return
        admitted = time.perf_counter()  # before the context pass: encoding the context is generation work
        bot = self.bot
        counts = [job.gen.num_candidates for job in jobs]
        prompts = [bot.forward_layout.prompt(job.context) for job in jobs]
        contexts = [ids for ids, _, _ in prompts]
        room = max(job.gen.max_length for job in jobs) + 1
        if bot.forward_layout.token_types:  # each context's token types and its reply's (cdial: its speaker)
            new_slots, logits = self.rows.admit(contexts, counts, room, [types for _, types, _ in prompts],
                                                [reply for _, _, reply in prompts])
        else:
            new_slots, logits = self.rows.admit(contexts, counts, room)
        self.slots = torch.cat([self.slots, new_slots])
        self.candidate = torch.cat([self.candidate] + [torch.arange(n) for n in counts])
        logits = logits.float()
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        pad = self.banned[:1] if len(self.banned) else None
        if self.history.shape[1] and pad is None:
            raise ValueError("no banned token to pad the penalty history with: requests cannot join")
        new_history = (pad.expand(len(new_slots), self.history.shape[1]) if self.history.shape[1]
                       else self.history.new_zeros(len(new_slots), 0))
        self.history = torch.cat([self.history, new_history])
        self.requests.extend(JobRows(job) for job in jobs)
        for request in self.requests[-len(jobs):]:
            request.batch_size, request.admitted = len(self.requests), admitted

    def step(self) -> list[JobRows]:
        """One token for every live row; returns the requests whose candidates are now all finished."""
        bot = self.bot
        logits, device = self.logits, self.bot.device
        logprobs = torch.log_softmax(logits, dim=-1)     # the model's own distribution: the forward score
        # consecutive requests with equal settings are filtered together (the usual case on the web page)
        groups: list[tuple[GenerationSettings, list[tuple[int, torch.Generator]], list[int]]] = []
        for request in self.requests:
            job = request.job
            if groups and groups[-1][0] == job.gen:
                groups[-1][1].append((request.live, job.generator))
                groups[-1][2].append(request.step)
            else:
                groups.append((job.gen, [(request.live, job.generator)], [request.step]))
        candidate = self.candidate.tolist()
        row_requests = [r for r in self.requests for _ in range(r.live)]
        picks, start = [], 0
        for gen, draws, steps in groups:
            counts = [n for n, _ in draws]
            part = slice(start, start + sum(counts))
            row_steps = torch.repeat_interleave(torch.tensor(steps), torch.tensor(counts)).to(device)
            history = self.history[part]
            picks.append(bot._next_tokens(
                logits[part], history if history.shape[1] else None,
                [r.tokens[c] for r, c in zip(row_requests[part], candidate[part])], row_steps, gen, draws,
                self.banned))
            start = part.stop
        next_ids = picks[0] if len(picks) == 1 else torch.cat(picks)
        chosen = logprobs.gather(-1, next_ids[:, None]).squeeze(-1).double().cpu().tolist()
        finished = next_ids == bot.sep_id
        done = []
        for request, c, t, f, lp in zip(row_requests, candidate, next_ids.tolist(), finished.tolist(), chosen):
            request.fwd[c] += lp
            if f:
                request.live -= 1
            else:
                request.tokens[c].append(t)
        for request in self.requests:
            request.step += 1
            if not request.live:
                done.append(request)
        if done:
            self.requests = [r for r in self.requests if r.live]
        if bool(finished.any()):                          # finished rows leave the batch and the cache
            keep = (~finished).nonzero().squeeze(-1)
            self.slots = self.rows.leave(self.slots, finished)
            next_ids, self.candidate, self.history = next_ids[keep], self.candidate[keep.cpu()], self.history[keep]
        self.history = torch.cat([self.history, next_ids[:, None]], dim=1)
        if self.requests:
            self.logits = self.rows.step(next_ids, self.slots).float()
        else:
            self.logits, self.history = None, self.history[:, :0]
        return done
