"""The reply algorithm stated plainly: the oracle of the engine's tests and the benchmarks' baseline.

Context turns u1..uk are token ids, oldest first (as `ChatBot.prepare_context` returns them).
1. Sample each of the N candidates on its own, one token at a time: run the forward model over the whole
   sequence `[CLS] u1 [SEP] ... uk [SEP] reply-so-far` (no cache, no batch) and take the last position's
   logits; filter them with engine/sampling.py in the engine's order (repetition penalty over the reply so
   far; every special token but [SEP] banned; [SEP] banned before min_length and forced at max_length;
   repeated n-grams banned; [SEP] if nothing is left), then draw from the call's generator. Stop at [SEP].
   The forward score is the sum of the UNFILTERED log-probs of the reply's tokens and its [SEP].
2. The backward model reads `[CLS] reply [SEP] uk [SEP] ... [SEP]` (the `backward_context_turns` latest
   turns) in one pass; the backward score sums the log-probs of the context tokens only.
3. Score with `settings.mmi_score` (weights by `ranking_weights`); rank by score, ties in sampling order.
The engine gets the same numbers with a shared KV cache and batches (engine/bot.py, engine/decoding.py).
"""
from __future__ import annotations

import torch

from dialogpt_zh.engine.sampling import NEG_INF, apply_repetition_penalty, ban_repeated_ngrams, sample_tokens
from dialogpt_zh.sequence import build_sequence
from dialogpt_zh.settings import GenerationSettings, MMISettings, mmi_score, ranking_weights


@torch.inference_mode()
def logprob_sum(model, ids: list[int], start: int) -> float:
    """Sum of log P(ids[t] | ids[:t]) for t >= start, from one full forward pass of `ids`."""
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))


@torch.inference_mode()
def sample_reply(model, tokenizer, context: list[list[int]], gen: GenerationSettings,
                 generator: torch.Generator) -> list[int]:
    """One candidate's token ids (without its [SEP]), sampled as step 1 says."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    specials = set(tokenizer.all_special_ids) | {tokenizer.unk_token_id, tokenizer.pad_token_id, cls}
    banned = sorted(i for i in specials if i is not None and i != sep and i < model.config.vocab_size)
    prefix, reply = build_sequence(context, "forward", cls, sep), []
    while True:
        logits = model(input_ids=torch.tensor([prefix + reply])).logits[:, -1, :].float()
        logits = apply_repetition_penalty(logits, torch.tensor([reply]) if reply else None, gen.repetition_penalty)
        logits = logits.clone()
        logits[0, banned] = NEG_INF
        if len(reply) < gen.min_length:
            logits[0, sep] = NEG_INF
        if len(reply) >= gen.max_length:
            logits[0, :], logits[0, sep] = NEG_INF, 0.0
        logits = ban_repeated_ngrams(logits, [reply], gen.no_repeat_ngram_size)
        if logits.max() == NEG_INF:
            logits[0, sep] = 0.0
        token = int(sample_tokens(logits, gen.temperature, gen.top_k, gen.top_p, generator)[0])
        if token == sep:
            return reply
        reply.append(token)


def score_replies(forward_model, backward_model, tokenizer, context: list[list[int]], replies: list[list[int]],
                  mmi: MMISettings) -> list[dict]:
    """Steps 2 and 3 for each reply, one at a time: forward_logprob, backward_logprob (None without a
    backward model or with use_mmi off), num_tokens, num_context_tokens, score; in the given order."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    prefix = build_sequence(context, "forward", cls, sep)
    use_backward = backward_model is not None and mmi.use_mmi
    k = mmi.backward_context_turns
    scored_context = context[-k:] if k else context
    weights = ranking_weights(mmi, use_backward)
    out = []
    for reply in replies:
        fwd = logprob_sum(forward_model, prefix + reply + [sep], len(prefix))
        seq = build_sequence(scored_context + [reply], "backward", cls, sep)
        bwd = logprob_sum(backward_model, seq, len(reply) + 2) if use_backward else None
        n, n_ctx = len(reply) + 1, len(seq) - len(reply) - 2
        out.append(dict(forward_logprob=fwd, backward_logprob=bwd, num_tokens=n, num_context_tokens=n_ctx,
                        score=float(mmi_score(fwd, bwd or 0.0, n, n_ctx, *weights, mmi.normalize))))
    return out


def reference_reply(forward_model, backward_model, tokenizer, context: list[list[int]], gen: GenerationSettings,
                    mmi: MMISettings, generator: torch.Generator) -> list[tuple[list[int], dict]]:
    """N candidates sampled one by one, scored, ranked best first: [(token ids, scores)]."""
    replies = [sample_reply(forward_model, tokenizer, context, gen, generator) for _ in range(gen.num_candidates)]
    scores = score_replies(forward_model, backward_model, tokenizer, context, replies, mmi)
    return sorted(zip(replies, scores), key=lambda pair: -pair[1]["score"])
